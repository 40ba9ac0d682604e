"""lab.doccheck, the lint that the docs name what exists and draw the layers the contracts hold."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lab.doccheck import (
    Layer,
    check,
    compare_layers,
    layers_in_picture,
    layers_in_pyproject,
    main,
    mentions_in_markdown,
    mentions_in_python,
    resolves,
)

PYPROJECT = """
[tool.importlinter]
root_packages = ["glancefs"]

[[tool.importlinter.contracts]]
name = "top"
type = "layers"
containers = ["glancefs"]
layers = ["cli", "fs", "_auth : _client"]

[[tool.importlinter.contracts]]
name = "not layers"
type = "forbidden"
source_modules = ["glancefs.fs"]
forbidden_modules = ["httpx"]

[[tool.importlinter.contracts]]
name = "fs"
type = "layers"
containers = ["glancefs.fs"]
layers = ["mount", "reader | uploader", "(config)"]
"""

PICTURE = """\
# Architecture

<!-- layers: read by lab/doccheck.py -->
```text
glancefs/ ──────────── the package
  cli ──────────────── the command
  fs  the filesystem, described after two spaces
  _auth :
  _client ──────────── the client, its list going on from the line above
                       a description going on

glancefs/fs/
  mount ────────────── running a mount
  reader | uploader ── reads; writes
  config
```
"""


def test_markdown_names_stand_alone(tmp_path: Path) -> None:
    document = tmp_path / "README.md"
    document.write_text(
        "Use `glancefs.Client` and :class:`~glancefs.fs.cache.DataCache`, end glancefs.fs.\n"
        "Not ~/.local/state/glancefs/glancefs.log, fuse.glancefs, glancefs.1 or glancefs._*.\n"
    )
    found = [(m.line, m.name) for m in mentions_in_markdown(document)]
    assert found == [(1, "glancefs.Client"), (1, "glancefs.fs.cache.DataCache"), (1, "glancefs.fs")]


def test_python_names_come_from_docstrings_and_comments_only(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text(
        textwrap.dedent(
            '''\
            """The module, see glancefs.fs.mount."""

            import logging

            log = logging.getLogger("glancefs.upload")  # a logger, as glancefs.fs.uploader has


            def f() -> None:
                """One line,
                then glancefs.fs.naming.NameStream."""
                text = "glancefs.not_a_doc"
            '''
        )
    )
    found = [(m.line, m.name) for m in mentions_in_python(module)]
    assert sorted(found) == [(1, "glancefs.fs.mount"), (5, "glancefs.fs.uploader"),
                             (10, "glancefs.fs.naming.NameStream")]  # fmt: skip


@pytest.mark.parametrize(
    "name",
    [
        "glancefs.fs",  # a package
        "glancefs.fs.cache",  # a module
        "glancefs.Client",  # an attribute of a package
        "glancefs.fs.cache.DataCache.open",  # of a class in a module
        "glancefs.Client.images",  # what __init__ assigns to self
        "glancefs.Client.images.list",  # and beyond it: trusted
    ],
)
def test_names_that_exist(name: str) -> None:
    assert resolves(name)


@pytest.mark.parametrize(
    "name",
    ["glancefs.errors.Refusal", "glancefs.namespace", "glancefs.Nothing", "glancefs.fs.cache.Nope"],
)
def test_names_that_do_not(name: str) -> None:
    assert not resolves(name)


def test_the_layers_of_the_contracts(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    layers = layers_in_pyproject(tmp_path / "pyproject.toml")
    assert layers == {
        "glancefs": [
            Layer(frozenset({"cli"}), False),
            Layer(frozenset({"fs"}), False),
            Layer(frozenset({"_auth", "_client"}), False),
        ],
        "glancefs.fs": [
            Layer(frozenset({"mount"}), False),
            Layer(frozenset({"reader", "uploader"}), True),
            Layer(frozenset({"config"}), False),
        ],
    }


def test_the_layers_of_the_picture() -> None:
    drawn = {
        container: [(layer.text(), layer.line) for layer in layers]
        for container, layers in layers_in_picture(PICTURE).items()
    }
    assert drawn == {
        "glancefs": [("cli", 6), ("fs", 7), ("_auth : _client", 8)],
        "glancefs.fs": [("mount", 13), ("reader | uploader", 14), ("config", 15)],
    }


def test_a_picture_without_its_marker_or_with_a_line_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="marker"):
        layers_in_picture(PICTURE.replace("<!-- layers", "<!-- other"))
    with pytest.raises(ValueError, match="line 7: not a layer's modules"):
        layers_in_picture(PICTURE.replace("  fs  the", "  fs, the"))


def test_a_picture_that_agrees_with_the_contracts(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    contracts = layers_in_pyproject(tmp_path / "pyproject.toml")
    assert list(compare_layers(contracts, layers_in_picture(PICTURE), "A.md")) == []


@pytest.mark.parametrize(
    ("picture", "problems"),
    [
        (
            PICTURE.replace("  config\n", ""),
            ["A.md:13: glancefs.fs.config is in pyproject.toml's layers, not in the picture"],
        ),
        (
            PICTURE.replace("  config\n", "  config : status\n"),
            ["A.md:15: glancefs.fs.status is in the picture, not in pyproject.toml's layers"],
        ),
        (
            PICTURE.replace("reader | uploader", "reader").replace("config", "config | uploader"),
            [
                "A.md:15: glancefs.fs.uploader is in layer 3 (config | uploader), "
                "in pyproject.toml in layer 2 (reader | uploader)"
            ],
        ),
        (
            PICTURE.replace("reader | uploader", "reader : uploader"),
            [
                "A.md:14: layer 2 of glancefs.fs is reader : uploader, in pyproject.toml "
                "reader | uploader"
            ],
        ),
        (
            PICTURE.replace("glancefs/fs/", "glancefs/read/"),
            [
                "A.md: glancefs.fs has layers in pyproject.toml but not in the picture",
                "A.md: glancefs.read is in the picture but has no layers contract",
            ],
        ),
    ],
    ids=["missing", "extra", "other layer", "not independent", "other container"],
)
def test_what_differs_from_the_contracts(picture: str, problems: list[str], tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    contracts = layers_in_pyproject(tmp_path / "pyproject.toml")
    assert list(compare_layers(contracts, layers_in_picture(picture), "A.md")) == problems


def test_a_tree_is_checked_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / "ARCHITECTURE.md").write_text(PICTURE.replace("  cli ", "  manpage "))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "api.md").write_text("Call glancefs.Client.request;\nnot glancefs.Gone.\n")
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "tool.py").write_text("# see glancefs.fs.gone\n")
    expected = [
        "docs/api.md:2: glancefs.Gone does not exist",
        "lab/tool.py:1: glancefs.fs.gone does not exist",
        "ARCHITECTURE.md:6: glancefs.cli is in pyproject.toml's layers, not in the picture",
        "ARCHITECTURE.md:6: glancefs.manpage is in the picture, not in pyproject.toml's layers",
    ]
    assert check(tmp_path) == expected
    assert main([str(tmp_path)]) == 1
    assert capsys.readouterr().out.splitlines() == expected
    (tmp_path / "ARCHITECTURE.md").write_text(PICTURE)
    (tmp_path / "docs" / "api.md").write_text("Call glancefs.Client.request.\n")
    (tmp_path / "lab" / "tool.py").write_text("# see glancefs.fs.cache\n")
    assert main([str(tmp_path)]) == 0
