"""Command line for `make demo`, `make demo-stop` and benchmarks.

    python -m lab glance-start --dir DIR [--flavor noauth|fakeauth] [--port N]
    python -m lab glance-stop --dir DIR
    python -m lab venvs [--keystone] [--swift]

glance-start leaves Glance running after the command exits (detached, no watchdog),
records {"url", "pid", "pgid", ...} in DIR/glance.json and prints the URL; running it
again while that server is up just prints the URL.  glance-stop is idempotent.
"""

import argparse
import json
import sys
from pathlib import Path

from lab.servers import GlanceServer, stop_detached
from lab.venvs import ensure_glance_venv, ensure_keystone_venv, ensure_swift_venv

STATE_FILE = "glance.json"


def _running_url(state_file: Path) -> str | None:
    """URL of the server recorded in state_file if its gunicorn is still alive."""
    try:
        state = json.loads(state_file.read_text())
        pid = int(state["pid"])
        alive = b"gunicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(state["url"]) if alive else None


def glance_start(workdir: Path, flavor: str, port: int | None) -> int:
    """Start a detached Glance in workdir and print its URL."""
    workdir = workdir.resolve()
    state_file = workdir / STATE_FILE
    url = _running_url(state_file)
    if url is not None:
        print(f"lab: glance already running in {workdir}", file=sys.stderr)
        print(url)
        return 0
    if flavor not in ("noauth", "fakeauth"):
        print("lab: glance-start supports --flavor noauth or fakeauth", file=sys.stderr)
        return 2
    server = GlanceServer(
        workdir, flavor="fakeauth" if flavor == "fakeauth" else "noauth", port=port, detach=True
    )
    server.start()
    state_file.write_text(json.dumps(server.state(), indent=2) + "\n")
    print(server.url)
    return 0


def glance_stop(workdir: Path) -> int:
    """Stop the Glance recorded in workdir/glance.json, if any."""
    stopped = stop_detached(workdir.resolve() / STATE_FILE)
    print("lab: glance stopped" if stopped else "lab: glance was not running", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one command."""
    parser = argparse.ArgumentParser(
        prog="python -m lab", description="Local Glance for glancefs demos and tests."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("glance-start", help="start a detached Glance, print its URL")
    start.add_argument(
        "--dir", type=Path, required=True, help="work dir (configs, data, logs, glance.json)"
    )
    start.add_argument("--flavor", choices=["noauth", "fakeauth"], default="noauth")
    start.add_argument("--port", type=int, default=None, help="default: a free port")
    stop = sub.add_parser("glance-stop", help="stop the Glance started in --dir (ok if none)")
    stop.add_argument("--dir", type=Path, required=True)
    venvs = sub.add_parser("venvs", help="install the server venvs now (once per machine)")
    venvs.add_argument("--keystone", action="store_true", help="also the keystone venv")
    venvs.add_argument("--swift", action="store_true", help="also the swift venv (lab.swift)")
    args = parser.parse_args(argv)
    if args.command == "glance-start":
        return glance_start(args.dir, args.flavor, args.port)
    if args.command == "glance-stop":
        return glance_stop(args.dir)
    print(ensure_glance_venv())
    if args.keystone:
        print(ensure_keystone_venv())
    if args.swift:
        print(ensure_swift_venv())
    return 0


if __name__ == "__main__":
    sys.exit(main())
