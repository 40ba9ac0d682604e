"""Reads of images on the stores production clouds run (lab.stores): Ceph RBD and Swift, whose
Glance answers every ranged GET with 400, beside the file store, which takes ranges.

Every read a user does with ordinary tools: ``cat``/``cmp``, ``dd skip=``, ``tail``, qemu-img on a
sparse qcow2 with data at 0, 2 GiB and 3 GiB, fio's random 4 KiB reads with verify, ``mmap``, a
loop-mounted ext4, ``isoinfo``, ``tar`` and ``cp -a`` out of the mount, two readers at once, on
each store, with and without ``--cache-dir``; the image-data requests counted per image: one per
pass on a store without ranges, none after a remount with the cache (SEMANTICS.md, "Stores without
ranges"). Mounts go through a counting proxy (lab.faults) in front of the session's stores Glance,
with their own ``--spool-dir``; every test mounts afresh, so no page, spool or cache entry of an
earlier test serves it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MountFactory
from support import GlanceAPI, Mount, far_qcow2, tool, wait_verified

from lab.faults import IMAGE_DATA, DataGet, FaultProxy, Request
from lab.servers import GlanceServer

MiB = 1024 * 1024
GiB = 1024 * MiB
STORES = ["fs", "ceph", "swift"]
#: Stores whose Glance refuses ranges: one download from byte 0 per pass.
WHOLE_ONLY = {"ceph", "swift"}


@dataclass(frozen=True)
class Source:
    """A local file and the image Glance made of it."""

    path: Path
    image: dict

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()

    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _made(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr


def make_sources(directory: Path) -> dict[str, tuple[Path, str]]:
    """The local files every store gets an image of, with their disk formats."""
    raw = directory / "random.raw"  # an odd size: the last block is short
    raw.write_bytes(random.Random(21).randbytes(8 * MiB + 4099))

    qcow2 = far_qcow2(directory / "far.qcow2")

    tree = directory / "tree"  # the files inside the ext4 and the ISO
    tree.mkdir()
    (tree / "blob.bin").write_bytes(random.Random(22).randbytes(3 * MiB + 5))
    (tree / "readme.txt").write_text("inside an image\n")
    ext4 = directory / "fs.ext4"
    with ext4.open("wb") as sparse:
        sparse.truncate(16 * MiB)
    _made(tool("mkfs.ext4", "-q", "-d", str(tree), str(ext4)))
    iso = directory / "tree.iso"
    _made(tool("genisoimage", "-quiet", "-R", "-o", str(iso), str(tree)))

    fio = directory / "fio.raw"  # blocks with fio's verify headers (crc32c), in random order
    _made(
        tool(
            "fio", "--name=layout", f"--filename={fio}", "--rw=randwrite", "--bs=4k",
            "--size=4M", "--verify=crc32c", "--do_verify=0", "--verify_state_save=0",
            "--output=/dev/null",
        )
    )  # fmt: skip
    return {
        "raw": (raw, "raw"),
        "qcow2": (qcow2, "qcow2"),
        "ext4": (ext4, "raw"),
        "iso": (iso, "iso"),
        "fio": (fio, "raw"),
    }


@pytest.fixture(scope="module")
def local_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return make_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module", params=STORES)
def store(request: pytest.FixtureRequest) -> str:
    """The store of the images a test reads (tests run grouped by store)."""
    store_id: str = request.param
    return store_id


@pytest.fixture(scope="module")
def images(
    store: str, stores_api: GlanceAPI, local_files: dict[str, tuple[Path, str]]
) -> dict[str, Source]:
    """Each local file as an image in ``store``."""
    made = {}
    for kind, (path, disk_format) in local_files.items():
        name = f"{kind}-{store}-{uuid.uuid4().hex[:6]}"
        image = stores_api.create(name, path.read_bytes(), store=store, disk_format=disk_format)
        assert image["stores"] == store
        made[kind] = Source(path, image)
    return made


@pytest.fixture(scope="module")
def module_proxy(stores_glance: GlanceServer) -> Iterator[FaultProxy]:
    with FaultProxy(stores_glance.url, seed=21) as proxy:
        yield proxy


@pytest.fixture
def proxy(module_proxy: FaultProxy) -> Iterator[FaultProxy]:
    """The counting proxy in front of the stores Glance, with no rules and zero counts."""
    module_proxy.clear()
    module_proxy.reset_counts()
    yield module_proxy
    module_proxy.clear()


@pytest.fixture(params=["no-cache", "cache"])
def options(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, ...]:
    """The mount's options: its own spool, and a cache directory in the ``cache`` variant."""
    spool = tmp_path / "spool"
    spool.mkdir()
    cache = ("--cache-dir", str(tmp_path / "cache")) if request.param == "cache" else ()
    return ("--spool-dir", str(spool), *cache)


@pytest.fixture
def mounted(proxy: FaultProxy, mount_glancefs: MountFactory, options: tuple[str, ...]) -> Mount:
    return mount_glancefs(proxy.url, *options)


def path_of(mount: Mount, source: Source) -> Path:
    image_id: str = source.image["id"]
    return mount.path / "by-id" / image_id


def test_cat_and_cmp_read_every_byte(mounted: Mount, images: dict[str, Source]) -> None:
    raw = images["raw"]
    path = path_of(mounted, raw)
    assert tool("sh", "-c", f"cat '{path}' | sha256sum").stdout.split()[0] == raw.sha256()
    compared = tool("cmp", str(path), str(raw.path))
    assert compared.returncode == 0, compared.stdout + compared.stderr


def test_dd_skip_and_tail_read_far_in(mounted: Mount, images: dict[str, Source]) -> None:
    raw = images["raw"]
    path, data = path_of(mounted, raw), raw.data
    for command, expected in (
        (
            ["dd", f"if={path}", "bs=1M", "skip=5", "count=2", "status=none"],
            data[5 * MiB : 7 * MiB],
        ),
        (["tail", "-c", "4096", str(path)], data[-4096:]),
    ):
        out = subprocess.run(command, capture_output=True, check=False, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout == expected, command


def test_qemu_img_info_check_compare_convert_of_a_sparse_qcow2(
    mounted: Mount, images: dict[str, Source], tmp_path: Path
) -> None:
    qcow2 = images["qcow2"]
    path = path_of(mounted, qcow2)
    info = tool("qemu-img", "info", "--output=human", str(path))
    assert info.returncode == 0, info.stderr
    assert "virtual size: 4 GiB (4294967296 bytes)" in info.stdout
    assert "file format: qcow2" in info.stdout
    check = tool("qemu-img", "check", str(path))
    assert check.returncode == 0, check.stdout + check.stderr
    compare = tool("qemu-img", "compare", str(path), str(qcow2.path))
    assert compare.returncode == 0, compare.stdout + compare.stderr
    converted = tmp_path / "converted.raw"
    convert = tool("qemu-img", "convert", "-O", "raw", str(path), str(converted))
    assert convert.returncode == 0, convert.stderr
    against = tool("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(converted),
                   str(qcow2.path))  # fmt: skip
    assert against.returncode == 0, against.stdout + against.stderr
    with converted.open("rb") as raw:
        raw.seek(3 * GiB)
        assert raw.read(2 * MiB) == b"\x5a" * (2 * MiB)


def test_fio_random_4k_reads_verify_every_block(mounted: Mount, images: dict[str, Source]) -> None:
    path = path_of(mounted, images["fio"])
    fio = tool(
        "fio", "--name=randread", f"--filename={path}", "--readonly", "--rw=randread",
        "--bs=4k", "--size=4M", "--verify=crc32c", "--invalidate=0",
    )  # fmt: skip
    assert fio.returncode == 0, fio.stdout + fio.stderr
    assert "err= 0" in fio.stdout
    assert "io=4096KiB" in fio.stdout  # every block was read, and verified


# In a process of its own: a page fault on the mount holds the faulting process's mmap lock until
# glancefs answers, and glancefs's answer goes through the proxy's threads in the test process.
MMAP_READER = r"""
import mmap, sys
image, source, offsets = sys.argv[1], sys.argv[2], [int(arg) for arg in sys.argv[3:]]
with open(source, "rb") as f:
    data = f.read()
with open(image, "rb") as f:
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
print(len(mapped), [at for at in offsets if mapped[at : at + 4096] != data[at : at + 4096]])
"""


def test_mmap_reads_pages_anywhere(mounted: Mount, images: dict[str, Source]) -> None:
    raw = images["raw"]
    size = raw.image["size"]
    offsets = [size - 100, 6 * MiB + 5, MiB, 0]  # back to front
    read = tool(sys.executable, "-c", MMAP_READER, str(path_of(mounted, raw)), str(raw.path),
                *map(str, offsets))  # fmt: skip
    assert read.returncode == 0, read.stderr  # a page the mount failed is SIGBUS
    assert read.stdout.split() == [str(size), "[]"]  # its size, no page differs


def test_a_loop_mounted_ext4_image(
    mounted: Mount, images: dict[str, Source], local_files: dict[str, tuple[Path, str]],
    tmp_path: Path,
) -> None:  # fmt: skip
    target = tmp_path / "ext4"
    target.mkdir()
    attached = tool("mount", "-o", "loop,ro", str(path_of(mounted, images["ext4"])), str(target))
    assert attached.returncode == 0, attached.stderr
    try:
        tree = local_files["ext4"][0].parent / "tree"
        for name in ("blob.bin", "readme.txt"):
            assert (target / name).read_bytes() == (tree / name).read_bytes(), name
    finally:
        # umount frees the loop device too (mount -o loop sets autoclear)
        assert tool("umount", str(target)).returncode == 0


def test_isoinfo_lists_and_extracts(
    mounted: Mount, images: dict[str, Source], local_files: dict[str, tuple[Path, str]]
) -> None:
    path = path_of(mounted, images["iso"])
    listed = tool("isoinfo", "-i", str(path), "-R", "-f")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["/blob.bin", "/readme.txt"]
    extracted = subprocess.run(
        ["isoinfo", "-i", str(path), "-R", "-x", "/blob.bin"], capture_output=True, check=False
    )
    assert extracted.returncode == 0, extracted.stderr
    tree = local_files["iso"][0].parent / "tree"
    assert extracted.stdout == (tree / "blob.bin").read_bytes()


def test_tar_and_cp_a_copy_images_out(
    mounted: Mount, images: dict[str, Source], tmp_path: Path
) -> None:
    chosen = [images["raw"], images["iso"]]
    ids = [source.image["id"] for source in chosen]
    untarred = tmp_path / "untarred"
    untarred.mkdir()
    tarred = tool("sh", "-c", f"tar -C '{mounted.path / 'by-id'}' -cf - {' '.join(ids)} | "
                  f"tar -C '{untarred}' -xf -")  # fmt: skip
    assert tarred.returncode == 0, tarred.stderr
    copied = tmp_path / "copied"
    copied.mkdir()
    cp = tool("cp", "-a", *(str(path_of(mounted, source)) for source in chosen), str(copied))
    assert cp.returncode == 0, cp.stderr
    for source in chosen:
        for out in (untarred, copied):
            assert (out / source.image["id"]).read_bytes() == source.data, (out, source.path)


def test_two_readers_at_different_offsets(mounted: Mount, images: dict[str, Source]) -> None:
    raw = images["raw"]
    data, path = raw.data, path_of(mounted, raw)
    got: dict[int, bytes] = {}
    failed: list[BaseException] = []

    def read_from(offset: int) -> None:
        try:
            with open(path, "rb", buffering=0) as f:
                f.seek(offset)
                pieces = []
                while piece := f.read(128 * 1024):
                    pieces.append(piece)
                got[offset] = b"".join(pieces)
        except BaseException as error:  # the test reports it
            failed.append(error)

    readers = [threading.Thread(target=read_from, args=(offset,)) for offset in (6 * MiB, 0)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=120)
    assert not failed, failed
    assert got[0] == data
    assert got[6 * MiB] == data[6 * MiB :]


def read_out_of_order(path: Path, size: int) -> bytes:
    """The whole file, read with one open: its last block first, then from the start."""
    with open(path, "rb", buffering=0) as f:
        tail = os.pread(f.fileno(), 4096, size - 4096)
        whole = b"".join(iter(lambda: f.read(MiB), b""))
    assert tail == whole[-4096:]
    return whole


def downloads(gets: list[DataGet]) -> list[DataGet]:
    """The GETs of a whole image (no Range)."""
    return [get for get in gets if get.range is None]


def test_one_data_request_per_pass_and_none_after_a_remount_with_the_cache(
    store: str,
    images: dict[str, Source],
    proxy: FaultProxy,
    mount_glancefs: MountFactory,
    options: tuple[str, ...],
) -> None:
    raw, teacher = images["raw"], images["iso"]
    data, image_id = raw.data, raw.image["id"]
    first = mount_glancefs(proxy.url, *options, name="first")
    # A mount learns that a store takes no ranges from its first refusal (400): the first read
    # far into an image there costs one ranged GET more.
    assert read_out_of_order(path_of(first, teacher), len(teacher.data)) == teacher.data
    taught = proxy.data_gets(teacher.image["id"])
    if store in WHOLE_ONLY:
        assert downloads(taught) == [DataGet(teacher.image["id"], None)], taught
        assert len(taught) > 1, taught  # the refused ranged GETs that taught it
    assert read_out_of_order(path_of(first, raw), len(data)) == data
    gets = proxy.data_gets(image_id)
    if store in WHOLE_ONLY:
        assert gets == [DataGet(image_id, None)]  # one download from byte 0, no range asked
    else:
        assert gets  # ranged GETs: as many as the readers need
    cached = "--cache-dir" in options
    if cached:
        wait_verified(Path(options[options.index("--cache-dir") + 1]), data)
    first.stop()

    proxy.reset_counts()
    second = mount_glancefs(proxy.url, *options, name="second")
    assert read_out_of_order(path_of(second, raw), len(data)) == data
    again = proxy.data_gets(image_id)
    if cached:
        assert again == []
    elif store in WHOLE_ONLY:  # the new mount learns again: a refusal, then one download
        assert downloads(again) == [DataGet(image_id, None)]


def whole(request: Request) -> bool:
    """A GET of a whole image (the refused ranged ones carry an error page)."""
    return request.header("Range") is None


@pytest.fixture
def on_rbd(stores_api: GlanceAPI) -> tuple[dict, bytes]:
    """An image of its own on Ceph RBD (a store without ranges), and its data."""
    data = random.Random(23).randbytes(8 * MiB + 3)
    return stores_api.create(f"rbd-{uuid.uuid4().hex[:6]}", data, store="ceph"), data


def test_a_download_cut_by_a_reset_starts_again_from_byte_0(
    on_rbd: tuple[dict, bytes], proxy: FaultProxy, mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    """A broken download cannot resume where it broke: it starts over and skips what the spool
    has, and a reader of the end (served from the spool) gets exact bytes."""
    image, data = on_rbd
    cut = proxy.reset_after(3 * MiB + 7, method="GET", path=IMAGE_DATA, where=whole, times=1)
    mount = mount_glancefs(proxy.url, "--spool-dir", str(tmp_path))
    assert read_out_of_order(mount.path / "by-id" / image["id"], len(data)) == data
    assert cut.fired == 1
    assert downloads(proxy.data_gets(image["id"])) == [DataGet(image["id"], None)] * 2


def test_a_flipped_byte_fails_its_pass_and_the_next_open_reads_exact(
    on_rbd: tuple[dict, bytes], proxy: FaultProxy, mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    image, data = on_rbd
    flip = proxy.flip_byte(method="GET", path=IMAGE_DATA, where=whole, times=1)
    mount = mount_glancefs(proxy.url, "--spool-dir", str(tmp_path))
    path = mount.path / "by-id" / image["id"]
    with pytest.raises(OSError) as failed:
        read_out_of_order(path, len(data))
    assert failed.value.errno == errno.EIO
    assert flip.fired == 1
    assert read_out_of_order(path, len(data)) == data  # a fresh pass, no SIGHUP


def test_an_image_larger_than_the_spool_reads_only_from_its_start(
    on_rbd: tuple[dict, bytes], proxy: FaultProxy, mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    """``tail`` needs the spool, which is smaller than the image: EFBIG and one log line, never
    a wrong byte; ``cat`` from the start needs no spool and reads it whole."""
    image, data = on_rbd
    mount = mount_glancefs(proxy.url, "--spool-dir", str(tmp_path), "--spool-size", "1M")
    path = mount.path / "by-id" / image["id"]
    tail = tool("tail", "-c", "4096", str(path))
    assert tail.returncode != 0
    assert "File too large" in tail.stderr
    cat = subprocess.run(["cat", str(path)], capture_output=True, timeout=120, check=False)
    assert cat.returncode == 0, cat.stderr
    assert cat.stdout == data
    lines = [line for line in mount.log().splitlines() if "--spool-size" in line]
    assert len(lines) == 1, lines
    assert "Traceback" not in mount.log()
