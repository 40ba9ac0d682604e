"""Helpers for integration tests: a plain HTTP view of the real Glance, and real mounts.

The tests talk to Glance directly (httpx, synchronously) to set up and check what the mount shows,
so that a bug in glancefs's own client cannot hide behind itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

GLANCEFS = str(Path(sys.executable).with_name("glancefs"))


class GlanceAPI:
    """Just enough of the Glance v2 API to arrange and inspect test data."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, headers=headers or {}, timeout=60)

    def create(self, name: str | None = "image", data: bytes | None = None, **fields: Any) -> dict:
        fields.setdefault("disk_format", "raw")
        fields.setdefault("container_format", "bare")
        response = self.http.post("/v2/images", json={"name": name, **fields})
        response.raise_for_status()
        image = response.json()
        if data is not None:
            self.upload(image["id"], data)
            image = self.get(image["id"])
        return image

    def upload(self, image_id: str, data: bytes) -> None:
        response = self.http.put(
            f"/v2/images/{image_id}/file",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        response.raise_for_status()

    def get(self, image_id: str) -> dict:
        response = self.http.get(f"/v2/images/{image_id}")
        response.raise_for_status()
        return response.json()

    def exists(self, image_id: str) -> bool:
        return self.http.get(f"/v2/images/{image_id}").status_code == 200

    def list(self, **params: Any) -> list[dict]:
        images: list[dict] = []
        path: str | None = "/v2/images"
        query: dict[str, Any] | None = {"limit": 1000, **params}
        while path:
            body = self.http.get(path, params=query).json()
            images += body["images"]
            path = body.get("next") if body["images"] else None
            query = None
        return images

    def delete(self, image_id: str) -> None:
        self.http.patch(
            f"/v2/images/{image_id}",
            json=[{"op": "replace", "path": "/protected", "value": False}],
            headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
        )
        self.http.delete(f"/v2/images/{image_id}")

    def close(self) -> None:
        self.http.close()


class Mount:
    """A glancefs mount run in the foreground as a child process, logging to a file."""

    def __init__(
        self, mountpoint: Path, log_path: Path, argv: list[str], env: dict[str, str] | None = None
    ) -> None:
        self.path = mountpoint
        self.log_path = log_path
        self.argv = argv
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.connection: int | None = None

    def start(self, timeout: float = 30.0) -> Mount:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env
            )
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"glancefs exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"glancefs did not mount in {timeout} s:\n{self.log()}")
            time.sleep(0.05)
        self.connection = os.minor(os.stat(self.path).st_dev)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Unmount and wait for the process; if it hangs, abort its FUSE connection and kill it."""
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False)
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                abort = Path(f"/sys/fs/fuse/connections/{self.connection}/abort")
                if self.connection is not None and abort.exists():
                    abort.write_text("1")
                self.proc.kill()
                self.proc.wait(timeout=15)

    def run(self, *command: str, check: bool = True, timeout: float = 120) -> str:
        """Run an ordinary tool with the mount as working directory; return its stdout."""
        result = subprocess.run(
            command, cwd=self.path, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{command} exited {result.returncode}: {result.stderr}")
        return result.stdout


def tool(*command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, never raise on a non-zero exit."""
    return subprocess.run(
        command, capture_output=True, text=True, errors="replace", timeout=timeout, check=False
    )


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise RuntimeError(f"missing tools {missing}: run `make deps`")
