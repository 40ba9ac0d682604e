"""The read path: how the bytes of an open image reach its readers, verified.

The parts, each of its own module (ARCHITECTURE.md places them):

* :mod:`.readers`: the open files' readers and the per-image feeds they share (the entry point
  for the FUSE adapter);
* :mod:`.feed`: one image's feed, wiring the parts below;
* :mod:`.policy`: every knob, and the one rule for "sequential";
* :mod:`.verification`: what is verified of the bytes served (pure bookkeeping);
* :mod:`.stream`: the one download and its buffer, its window and its connection;
* :mod:`.source`: every download of image data, counted in one place; which stores take ranges;
* :mod:`.spooled`: reads of a store without ranges, through the mount's spool
  (:mod:`glancefs.fs.spool`);
* :mod:`.blocks`: the last few blocks in memory;
* :mod:`.cached`: the persistent data cache's use by a feed.
"""

from .policy import PrefetchBudget, ReadTuning
from .readers import ImageReader, Readers

__all__ = [
    "ImageReader",
    "PrefetchBudget",
    "ReadTuning",
    "Readers",
]
