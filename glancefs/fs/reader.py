"""Reading image data: one :class:`ImageReader` per open file, one shared feed per image.

Every request costs Glance about 10 ms and one of its few request threads, so a mount must not
pay one per FUSE read, nor one download per open file. All open files of an image share one
:class:`~glancefs.fs.feed.ImageFeed` (refcounted here by :class:`Readers`): one download that
runs ahead of the readers into a buffer, the kernel's readahead included (its reads of one file
arrive out of order, and a read a little ahead of the download waits for it), a few cached
blocks for random readers, and one running hash. Four ``cat`` of one image cost Glance one data
stream.

What is verified (the contract; the feed's docstring says how):

* Every byte glancefs serves from a verifying mount is either hashed by the image's running
  hash in the very buffer it was served from, or recorded with its crc32 and compared with the
  bytes the hash sees at that place.
* Once the bytes served cover the whole image (a sequential read, several readers together, or
  a re-read), the read that served the last bytes not served before, and the read that reaches
  the image's end, return only after every served byte was verified: a reader that was served
  every byte gets its end-of-file only for verified data, whichever order its reads complete
  in and whether the kernel served some of them from the page cache.
* A mismatch is sticky for the image in this mount: every open file of it fails its next read
  with EIO, its cached pages are dropped, one line is logged; SIGHUP (:meth:`Readers.reset`)
  or a remount clears it.
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

from glancefs import Client, Image, IntegrityError

from .cache import DataCache
from .cached import cached_image
from .feed import ImageFeed, PrefetchBudget, ReadTuning

__all__ = ["ImageReader", "PrefetchBudget", "ReadTuning", "Readers"]


class ImageReader:
    """Serves ``read(offset, size)`` for one open file of an image; release it through
    :meth:`Readers.release`."""

    def __init__(self, feed: ImageFeed, tuning: ReadTuning) -> None:
        self.feed = feed
        self._tuning = tuning
        self._last_end = -1
        self._continuing_reads = 0

    async def read(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of the image, fewer at its end, none past it.

        The read that reaches the end waits for the image's verdict (see the module docstring).
        """
        feed = self.feed
        end = min(offset + size, feed.size)
        if offset >= end:
            await feed.verdict()
            return b""
        continuing = offset == self._last_end
        self._continuing_reads = self._continuing_reads + 1 if continuing else 0
        self._last_end = end
        sequential = offset == 0 or self._continuing_reads >= self._tuning.sequential_trigger
        data = await feed.read(offset, end, sequential=sequential)
        if end == feed.size:
            await feed.verdict()
        return data


class Readers:
    """The open files' readers of one mount, and the image feeds they share.

    ``on_corrupt(image_id, error)`` is called once per mismatch found (it logs and drops the
    image's cached pages). With a ``cache`` (``--cache-dir``), each feed of an image that can be
    cached reads and stores through its entry (:mod:`glancefs.fs.cached`); ``cache_fill``
    completes the entries of images read at random in the background.
    """

    def __init__(
        self,
        client: Client,
        nursery: trio.Nursery,
        on_corrupt: Callable[[str, IntegrityError], None],
        *,
        verify: bool = True,
        prefetch_memory: int = 128 * 1024 * 1024,
        tuning: ReadTuning | None = None,
        cache: DataCache | None = None,
        cache_fill: bool = False,
    ) -> None:
        self._client = client
        self._cache = cache
        self._cache_fill = cache_fill
        self._nursery = nursery
        self._on_corrupt = on_corrupt
        self._verify = verify
        self._budget = PrefetchBudget(prefetch_memory)
        self._tuning = tuning or ReadTuning()
        self._feeds: dict[str, ImageFeed] = {}
        #: Images whose served bytes were all verified when their last file closed.
        self._clean: set[str] = set()
        #: Images found corrupt in this mount, with the mismatch (until :meth:`reset`).
        self._corrupt: dict[str, IntegrityError] = {}

    def keeps_cache(self, image_id: str) -> bool:
        """Whether an open of the image may keep the kernel's cached pages (see the module
        docstring). Ask before :meth:`open`."""
        # While a feed lives, the cache holds only what it served (the open that created it
        # dropped the rest) and it tracks all of that; a mismatch drops the pages.
        return not self._verify or image_id in self._feeds or image_id in self._clean

    def open(self, image: Image) -> ImageReader:
        feed = self._feeds.get(image.id)
        if feed is None:
            feed = ImageFeed(
                self._client,
                image,
                self._nursery,
                self._budget,
                lambda error: self._found_corrupt(image.id, error),
                verify=self._verify,
                verified_cache=image.id in self._clean,
                cached=cached_image(
                    self._cache,
                    self._client,
                    image,
                    self._nursery,
                    verify=self._verify,
                    fill=self._cache_fill,
                ),
                tuning=self._tuning,
            )
            self._feeds[image.id] = feed
            if image.id in self._corrupt:
                feed.corrupt = self._corrupt[image.id]
        feed.open_files += 1
        return ImageReader(feed, self._tuning)

    def _found_corrupt(self, image_id: str, error: IntegrityError) -> None:
        self._corrupt[image_id] = error
        self._clean.discard(image_id)
        self._on_corrupt(image_id, error)

    async def release(self, reader: ImageReader) -> None:
        feed = reader.feed
        feed.open_files -= 1
        if feed.open_files > 0 or self._feeds.get(feed.image.id) is not feed:
            return
        del self._feeds[feed.image.id]
        if feed.clean:
            self._clean.add(feed.image.id)
        else:
            self._clean.discard(feed.image.id)
        await feed.aclose()

    def reset(self) -> None:
        """Forget every verification failure and verdict (SIGHUP)."""
        self._clean.clear()
        self._corrupt.clear()
        for feed in self._feeds.values():
            if feed.corrupt is not None:
                feed.reset()
