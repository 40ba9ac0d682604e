"""Reading image data: one :class:`ImageReader` per open file, one shared feed per image.

Every request costs Glance about 10 ms and one of its few request threads, so a mount must not
pay one per FUSE read, nor one download per open file. All open files of an image share one
:class:`~glancefs.fs.read.feed.ImageFeed` (refcounted here by :class:`Readers`): one download
that runs ahead of the readers into a buffer, the kernel's readahead included (its reads of one
file arrive out of order, and a read a little ahead of the download waits for it), a few cached
blocks for random readers (or the spool, on a store without ranges), and one running hash. Four
``cat`` of one image cost Glance one data stream.

What is verified (the contract; the feed's docstring says how):

* Every byte glancefs serves from a verifying mount is either hashed by the image's running
  hash in the very buffer it was served from, or recorded with its crc32 and compared with the
  bytes the hash sees at that place.
* Once the bytes served cover the whole image (a sequential read, several readers together, or
  a re-read), the read that served the last bytes not served before, and the read that reaches
  the image's end, return only after every served byte was verified: a reader that was served
  every byte gets its end-of-file only for verified data, whichever order its reads complete
  in and whether the kernel served some of them from the page cache.
* A mismatch fails every file of the image open during the bad pass: each fails its next read
  with EIO, the image's cached pages are dropped, one line is logged. An open after it starts a
  fresh feed (a new download, a new hash): a flipped byte on the wire heals by itself. Two
  passes in a row that mismatch against the same recorded hash make it sticky for the image in
  this mount, until SIGHUP (:meth:`Readers.reset`) or a remount.
* Not verified: a reader that only seeks around (qemu-img, fio) is served bytes no whole-image
  hash has checked yet; they are checked only if the image is later read whole in this mount.

The page cache: an open keeps the kernel's cached pages of the image while other files of it are
open (the feed served all of them and tracks them), or when everything the last feed served was
verified (:meth:`Readers.keeps_cache`); otherwise the kernel drops them. So cached pages are
always either verified or served by the feed that is verifying them.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from glancefs import Image, IntegrityError
from glancefs.plumbing import Verifier

from ..cache import DataCache
from ..glance import Glance
from ..spool import SpoolSpace, default_spool_dir
from ..status import STATUS
from .cached import cached_image
from .feed import ImageFeed
from .policy import AccessPattern, PrefetchBudget, ReadTuning
from .source import ImageSource, RangeSupport
from .verification import Verification

__all__ = ["ImageReader", "Readers"]

#: Passes in a row that mismatch the same recorded hash before an image stays corrupt.
STICKY_MISMATCHES = 2


class ImageReader:
    """Serves ``read(offset, size)`` for one open file of an image; release it through
    :meth:`Readers.release`."""

    def __init__(self, feed: ImageFeed, tuning: ReadTuning) -> None:
        self.feed = feed
        self._pattern = AccessPattern(tuning)

    async def read(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of the image, fewer at its end, none past it.

        The read that reaches the end waits for the image's verdict (see the module docstring).
        """
        feed = self.feed
        end = min(offset + size, feed.size)
        if offset >= end:
            await feed.verdict()
            return b""
        data = await feed.read(offset, end, self._pattern.observe(offset, end))
        if end == feed.size:
            await feed.verdict()
        return data


class Readers:
    """The open files' readers of one mount, and the image feeds they share.

    ``on_corrupt(image_id, error)`` is called once per mismatch found (it logs and drops the
    image's cached pages). With a ``cache`` (``--cache-dir``), each feed of an image that can be
    cached reads and stores through its entry (:mod:`glancefs.fs.read.cached`); ``cache_fill``
    completes the entries of images read at random in the background. ``spool`` is where images
    of stores without ranges are kept while they are read (:mod:`glancefs.fs.spool`).
    """

    def __init__(
        self,
        client: Glance,
        nursery: trio.Nursery,
        on_corrupt: Callable[[str, IntegrityError], None],
        *,
        verify: bool = True,
        prefetch_memory: int = 128 * 1024 * 1024,
        tuning: ReadTuning | None = None,
        cache: DataCache | None = None,
        cache_fill: bool = False,
        spool: SpoolSpace | None = None,
    ) -> None:
        self._client = client
        self._cache = cache
        self._cache_fill = cache_fill
        self._nursery = nursery
        self._on_corrupt = on_corrupt
        self._verify = verify
        self._budget = PrefetchBudget(prefetch_memory)
        self._tuning = tuning or ReadTuning()
        self._spool = spool or SpoolSpace(default_spool_dir())
        self._ranges = RangeSupport()
        self._feeds: dict[str, ImageFeed] = {}
        #: Images whose served bytes were all verified when their last file closed.
        self._clean: set[str] = set()
        #: Mismatches in a row per (image id, recorded hash), and the last one's error.
        self._mismatches: dict[tuple[str, str], tuple[int, IntegrityError]] = {}

    def keeps_cache(self, image_id: str) -> bool:
        """Whether an open of the image may keep the kernel's cached pages (see the module
        docstring). Ask before :meth:`open`."""
        # While a feed lives, the cache holds only what it served (the open that created it
        # dropped the rest) and it tracks all of that; a mismatch drops the pages.
        return not self._verify or image_id in self._feeds or image_id in self._clean

    def open(self, image: Image) -> ImageReader:
        feed = self._feeds.get(image.id)
        if feed is None:
            feed = self._new_feed(image)
            self._feeds[image.id] = feed
            mismatches, error = self._mismatches.get(_hash_key(image), (0, None))
            if mismatches >= STICKY_MISMATCHES and error is not None:
                feed.corrupt = error
        feed.open_files += 1
        return ImageReader(feed, self._tuning)

    def _new_feed(self, image: Image) -> ImageFeed:
        transfer = STATUS.started_transfer(image.id, image.name, "read", image.size or 0)
        source = ImageSource(
            self._client,
            image,
            transfer,
            whole_only=not self._ranges.takes_ranges(image),
            failure_grace=self._tuning.failure_grace,
        )
        verifies = self._verify and Verifier.for_image(image) is not None
        verification = Verification(
            image.id, source.size, (lambda: _verifier(image)) if verifies else None
        )
        if verifies and image.id in self._clean:
            # The kernel keeps the pages an earlier feed verified: they count as served, so the
            # end of a whole read waits for a pass over what this feed serves on top.
            verification.served.add(0, source.size)
        cached = cached_image(
            self._cache,
            source,
            self._nursery,
            self._tuning,
            verify=self._verify,
            fill=self._cache_fill,
        )
        return ImageFeed(
            source,
            self._nursery,
            self._budget,
            lambda error: self._found_corrupt(image, error),
            verification=verification,
            ranges=self._ranges,
            spool_space=self._spool,
            cached=cached,
            tuning=self._tuning,
        )

    def _found_corrupt(self, image: Image, error: IntegrityError) -> None:
        """A pass mismatched: the files open now keep failing; the next open starts a new feed,
        unless this is the second mismatch in a row of the same recorded hash."""
        key = _hash_key(image)
        mismatches, _ = self._mismatches.get(key, (0, None))
        self._mismatches[key] = (mismatches + 1, error)
        self._clean.discard(image.id)
        feed = self._feeds.get(image.id)
        if feed is not None and feed.corrupt is error:
            del self._feeds[image.id]  # its open files keep it; new opens start afresh
        self._on_corrupt(image.id, error)

    async def release(self, reader: ImageReader) -> None:
        feed = reader.feed
        feed.open_files -= 1
        if feed.open_files > 0:
            return
        if self._feeds.get(feed.image.id) is feed:
            del self._feeds[feed.image.id]
            if feed.clean:
                self._clean.add(feed.image.id)
                self._mismatches.pop(_hash_key(feed.image), None)
            else:
                self._clean.discard(feed.image.id)
        await feed.aclose()

    def reset(self) -> None:
        """Forget every verification failure and verdict (SIGHUP)."""
        self._clean.clear()
        self._mismatches.clear()
        for feed in self._feeds.values():
            if feed.corrupt is not None:
                feed.reset()


def _hash_key(image: Image) -> tuple[str, str]:
    return image.id, str(image.get("os_hash_value") or image.get("checksum") or "")


def _verifier(image: Image) -> Verifier:
    verifier = Verifier.for_image(image)
    assert verifier is not None
    return verifier
