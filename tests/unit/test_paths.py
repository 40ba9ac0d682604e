"""URL paths built from caller text: one encoder (glancefs._records.api_path), used everywhere.

The client's own request paths are checked at the source: a path written as an f-string with
a placeholder would bypass the encoder, so none may exist in the client modules.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from glancefs._records import api_path
from glancefs.fs.naming import is_id_shaped

CLIENT = Path(__file__).resolve().parents[2] / "glancefs"
#: A request path with a {placeholder}: text spliced into a URL without encoding.
SPLICED_PATH = re.compile(r"""f["']/v2/[^"']*\{""")


@pytest.mark.parametrize(
    ("segments", "path"),
    [
        (("x?y",), "/v2/images/x%3Fy"),
        (("a/b", "file"), "/v2/images/a%2Fb/file"),
        (("#frag", "tags", "t a g"), "/v2/images/%23frag/tags/t%20a%20g"),
        (("..", "tags", "."), "/v2/images/%2E%2E/tags/%2E"),
        (("%41",), "/v2/images/%2541"),  # already-encoded text is text: encoded again
        (("é\x00",), "/v2/images/%C3%A9%00"),
        (("",), "/v2/images/"),
    ],
)
def test_api_path_encodes_each_segment(segments: tuple[str, ...], path: str) -> None:
    assert api_path("/v2/images", *segments) == path


def test_literal_segments_are_unchanged() -> None:
    image_id = "0b0e4b3c-7e0d-4c8e-9c3a-3f3f2b8f1a11"
    assert api_path("/v2/images", image_id, "actions", "deactivate") == (
        f"/v2/images/{image_id}/actions/deactivate"
    )


def test_no_client_module_splices_text_into_a_path() -> None:
    spliced = [
        f"{module.name}:{number}: {line.strip()}"
        for module in sorted(CLIENT.glob("_*.py"))
        for number, line in enumerate(module.read_text().splitlines(), 1)
        if SPLICED_PATH.search(line)
    ]
    assert spliced == []


@pytest.mark.parametrize(
    ("name", "shaped"),
    [
        ("0b0e4b3c-7e0d-4c8e-9c3a-3f3f2b8f1a11", True),
        ("0B0E4B3C-7E0D-4C8E-9C3A-3F3F2B8F1A11", True),
        ("x?y", False),
        ("..", False),
        ("", False),
        ("0b0e4b3c-7e0d-4c8e-9c3a-3f3f2b8f1a11?", False),
        ("0b0e4b3c-7e0d-4c8e-9c3a-3f3f2b8f1a1/", False),
    ],
)
def test_id_shape(name: str, shaped: bool) -> None:
    assert is_id_shaped(name) is shaped
