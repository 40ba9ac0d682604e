"""Quotas end to end: Glance enforcing Keystone's unified limits (lab.limits), real mounts,
ordinary tools. Each limit Glance answers 413 for is EDQUOT ("Disk quota exceeded") for the
caller, with one log line naming the limit, and leaves no image behind; ``df`` shows the limits.

Every test works in a project of its own (the usage counts per project), with the limits it
needs set on that project over the module's registered ones.
"""

from __future__ import annotations

import errno
import os
import random
import re
from pathlib import Path

import pytest
from conftest import MountFactory
from support import GlanceAPI, Mount, base_env, status_of, tool, unique, wait_for

from lab.limits import LimitsLab, Project

pytestmark = pytest.mark.keystone

MiB = 1024 * 1024
QUOTA_EXCEEDED = os.strerror(errno.EDQUOT)  # "Disk quota exceeded"


def mount_in(
    limits: LimitsLab, project: Project, mount_glancefs: MountFactory, tmp_path: Path
) -> Mount:
    """glancefs mounted as user demo in ``project`` (OS_* variables, as after sourcing an openrc
    file), on the lab's Glance."""
    return mount_glancefs(limits.glance.url, env={**base_env(tmp_path), **project.env})


def mounted_project(
    limits: LimitsLab, mount_glancefs: MountFactory, tmp_path: Path, **project_limits: int
) -> tuple[GlanceAPI, Mount]:
    """A new project with ``project_limits``: Glance as demo in it, and a mount of it."""
    project = limits.project(unique("quota"), **project_limits)
    return limits.api(project), mount_in(limits, project, mount_glancefs, tmp_path)


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(random.randbytes(size))
    return path


def refusals_logged(mount: Mount, resource: str) -> list[str]:
    """The mount's log lines that report the quota ``resource`` exceeded: each must be one
    clean line."""
    lines = [line for line in mount.log().splitlines() if f"quota {resource} exceeded" in line]
    for line in lines:
        assert not re.search(r"[{}<>]|Traceback|Project ", line), line
    return lines


def test_image_count_total_refuses_a_new_file(
    limits: LimitsLab, mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    project = limits.project(unique("count"), image_count_total=1)
    api = limits.api(project)
    api.create("first", random.randbytes(3 * MiB))
    mount = mount_in(limits, project, mount_glancefs, tmp_path)

    # df: the registered image_size_total (64 MiB), the project's own image_count_total (1).
    df = mount.run("df", "-B1M", "--output=size,used,avail,itotal,iused,iavail", ".")
    assert df.splitlines()[1].split() == ["64", "3", "61", "1", "1", "0"]

    source = random_file(tmp_path / "disk.raw", 300_000)
    copied = tool("cp", str(source), str(mount.path / "new" / "second.raw"))
    assert copied.returncode != 0
    assert QUOTA_EXCEEDED in copied.stderr
    with pytest.raises(OSError) as touched:
        (mount.path / "new" / "third").touch()
    assert touched.value.errno == errno.EDQUOT

    assert [image["name"] for image in api.list()] == ["first"]
    assert len(refusals_logged(mount, "image_count_total")) == 2  # one line per refusal


def test_image_size_total_refuses_what_does_not_fit(
    limits: LimitsLab, mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    api, mount = mounted_project(limits, mount_glancefs, tmp_path, image_size_total=8)
    new = mount.path / "new"

    # A size set before the data goes with the upload: Glance counts it at once.
    announced = random_file(tmp_path / "announced.raw", 12 * MiB)
    assert tool("truncate", "-s", "12M", str(new / "announced.raw")).returncode == 0
    written = tool("dd", f"if={announced}", f"of={new / 'announced.raw'}", "bs=1M", "conv=notrunc")
    assert written.returncode != 0
    assert QUOTA_EXCEEDED in written.stderr
    assert api.list(name="announced.raw") == []

    # cp sends no size first: Glance checks only the usage so far, and lets it go past...
    first = random_file(tmp_path / "first.raw", 9 * MiB)
    assert tool("cp", str(first), str(new / "first.raw")).returncode == 0
    assert api.only("first.raw")["status"] == "active"
    # ...which refuses every later upload.
    second = random_file(tmp_path / "second.raw", 2 * MiB)
    copied = tool("cp", str(second), str(new / "second.raw"))
    assert copied.returncode != 0
    assert QUOTA_EXCEEDED in copied.stderr
    assert api.list(name="second.raw") == []
    assert [image["name"] for image in api.list()] == ["first.raw"]
    assert len(refusals_logged(mount, "image_size_total")) == 2


def test_image_count_uploading_refuses_a_second_writer(
    limits: LimitsLab, mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    api, mount = mounted_project(limits, mount_glancefs, tmp_path, image_count_uploading=1)
    new = mount.path / "new"
    first = random.randbytes(2 * MiB)
    second = random_file(tmp_path / "second.raw", 2 * MiB)

    with open(new / "slow.raw", "wb", buffering=0) as slow:  # a writer that takes its time
        slow.write(first[:MiB])
        wait_for(lambda: status_of(api, "slow.raw") == "saving", "the first upload to start")
        copied = tool("cp", str(second), str(new / "second.raw"))
        assert copied.returncode != 0
        assert QUOTA_EXCEEDED in copied.stderr
        slow.write(first[MiB:])
    assert api.only("slow.raw")["status"] == "active"  # the first writer was not disturbed
    assert api.list(name="second.raw") == []
    assert len(refusals_logged(mount, "image_count_uploading")) == 1


def test_image_stage_total_refuses_an_import_upload(
    limits: LimitsLab, mount_glancefs: MountFactory, tmp_path: Path
) -> None:
    """Under --import the data is staged: a size set first goes with the stage, which Glance
    refuses at once; the image is deleted, nothing stays staged."""
    project = limits.project(unique("stage"), image_stage_total=4)
    api = limits.api(project)
    mount = mount_glancefs(limits.glance.url, "--import", env={**base_env(tmp_path), **project.env})
    new = mount.path / "new"
    source = random_file(tmp_path / "staged.raw", 6 * MiB)
    assert tool("truncate", "-s", "6M", str(new / "staged.raw")).returncode == 0
    written = tool("dd", f"if={source}", f"of={new / 'staged.raw'}", "bs=1M", "conv=notrunc")
    assert written.returncode != 0
    assert QUOTA_EXCEEDED in written.stderr
    assert api.list(name="staged.raw") == []
    assert len(refusals_logged(mount, "image_stage_total")) == 1
