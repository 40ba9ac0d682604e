"""``make lint``'s checks that the docs name what the code has.

    python -m lab.doccheck [ROOT]

- **Names.** Every dotted name ``glancefs.<name>[.<name>...]`` in the Markdown files at the
  top level and under docs/, and in the docstrings and comments of glancefs/, lab/, bench/ and
  tests/, names something that exists in the tree as it is: a module that imports, or an
  attribute of one (of a class also an attribute its instances get: assigned to ``self`` or
  annotated in the class body). Code is not searched: the interpreter checks its names.
- **Layers.** ARCHITECTURE.md's picture (the code block after the ``<!-- layers`` marker) shows
  the layers of every ``layers`` contract of pyproject.toml, which import-linter checks, with the
  same modules on the same layer in the same order. In the picture a line at column 0 names a
  container as a path (``glancefs/fs/``); each line indented by two spaces below it is one layer,
  top to bottom: its modules as in pyproject.toml (``a | b``: independent, ``a : b``: not), a
  list that ends in ``|`` or ``:`` going on on the next line, then, after a run of ``─`` or
  of two spaces, what the layer does. Deeper-indented lines continue a description.

Prints one line per problem (``FILE:LINE: what``) and exits 1 when there is any.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import io
import re
import sys
import textwrap
import tokenize
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Layer",
    "Mention",
    "check",
    "compare_layers",
    "layers_in_picture",
    "layers_in_pyproject",
    "main",
    "mentions_in_markdown",
    "mentions_in_python",
    "resolves",
]

#: A dotted name on its own: not a file (``/glancefs.log``), a filesystem type (``fuse.glancefs``)
#: or a pattern (``glancefs._*``). A name broken across lines counts up to the break.
DOTTED_NAME = re.compile(r"(?<![\w./@-])glancefs(?:\.[A-Za-z_]\w*)+(?![\w*])")
PYTHON_DIRS = ("glancefs", "lab", "bench", "tests")
PICTURE_MARKER = "<!-- layers"
#: A layer's modules: names joined by ``|`` or ``:``, possibly ending in one (continued).
MODULES = re.compile(r"[A-Za-z_]\w*(?:\s*[|:]\s*[A-Za-z_]\w*)*(?:\s*[|:])?")


@dataclass(frozen=True)
class Mention:
    """A dotted name as written, and where."""

    path: Path
    line: int
    name: str


@dataclass(frozen=True)
class Layer:
    """One layer of a container: its modules and whether they are independent (``|``)."""

    modules: frozenset[str]
    independent: bool
    line: int = 0  # where the picture shows it; 0 for pyproject.toml

    @classmethod
    def parse(cls, expression: str, line: int = 0) -> Layer:
        modules = frozenset(m.strip(" ()") for m in re.split(r"[|:]", expression) if m.strip())
        return cls(modules, "|" in expression, line)

    def text(self) -> str:
        return (" | " if self.independent else " : ").join(sorted(self.modules))


# -- names --------------------------------------------------------------------------------------


def mentions_in_markdown(path: Path) -> Iterator[Mention]:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        for match in DOTTED_NAME.finditer(line):
            yield Mention(path, number, match[0])


def mentions_in_python(path: Path) -> Iterator[Mention]:
    """Names in the comments and in the string statements (docstrings) of a Python file."""
    source = path.read_text()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            for match in DOTTED_NAME.finditer(token.string):
                yield Mention(path, token.start[0], match[0])
    for node in ast.walk(ast.parse(source, str(path))):
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            text = node.value.value
            for match in DOTTED_NAME.finditer(text):
                line = node.lineno + text.count("\n", 0, match.start())
                yield Mention(path, line, match[0])


def resolves(name: str) -> bool:
    """Whether ``name`` is a module that imports or an attribute of one."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as missing:
            if missing.name is not None and f"{module_name}.".startswith(f"{missing.name}."):
                continue  # no such module: the last part may be an attribute
            raise  # the module exists but something it imports does not: no doc problem
        return _has_path(module, parts[cut:])
    return False


def _has_path(target: object, attributes: list[str]) -> bool:
    for attribute in attributes:
        if not hasattr(target, attribute):
            # An instance attribute of a class: what it holds is known only at run time, so the
            # rest of the name is trusted.
            return isinstance(target, type) and attribute in _instance_attributes(target)
        target = getattr(target, attribute)
    return True


def _instance_attributes(cls: type) -> set[str]:
    """Attributes an instance of ``cls`` gets: annotated in a class body of its MRO, or assigned
    to ``self.`` in one of their methods."""
    names: set[str] = set()
    for klass in cls.__mro__:
        names.update(getattr(klass, "__annotations__", {}))
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue  # builtins and classes made at run time
        for node in ast.walk(ast.parse(source)):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                names.add(node.attr)
    return names


def documents(root: Path) -> list[Path]:
    return sorted([*root.glob("*.md"), *(root / "docs").rglob("*.md")])


def python_files(root: Path) -> list[Path]:
    return sorted(path for directory in PYTHON_DIRS for path in (root / directory).rglob("*.py"))


def check_names(root: Path) -> Iterator[str]:
    mentions: list[Mention] = []
    for document in documents(root):
        mentions.extend(mentions_in_markdown(document))
    for path in python_files(root):
        mentions.extend(mentions_in_python(path))
    known: dict[str, bool] = {}
    for mention in mentions:
        if mention.name not in known:
            known[mention.name] = resolves(mention.name)
        if not known[mention.name]:
            where = mention.path.relative_to(root)
            yield f"{where}:{mention.line}: {mention.name} does not exist"


# -- layers -------------------------------------------------------------------------------------


def layers_in_pyproject(pyproject: Path) -> dict[str, list[Layer]]:
    """The layers of each container, from the ``layers`` contracts of import-linter."""
    config = tomllib.loads(pyproject.read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    layers: dict[str, list[Layer]] = {}
    for contract in contracts:
        if contract.get("type") != "layers":
            continue
        for container in contract.get("containers", []):
            layers[container] = [Layer.parse(expression) for expression in contract["layers"]]
    return layers


def layers_in_picture(text: str) -> dict[str, list[Layer]]:
    """The containers and layers of the code block after the picture's marker (module doc)."""
    lines = text.splitlines()
    start = next((n for n, line in enumerate(lines) if line.startswith(PICTURE_MARKER)), None)
    if start is None:
        raise ValueError(f"no {PICTURE_MARKER} ...--> marker")
    fence = next((n for n in range(start + 1, len(lines)) if lines[n].startswith("```")), None)
    if fence is None:
        raise ValueError(f"no code block after the {PICTURE_MARKER} marker")
    layers: dict[str, list[Layer]] = {}
    container: list[Layer] | None = None
    pending, pending_line = "", 0
    for number in range(fence + 1, len(lines)):
        line = lines[number]
        if line.startswith("```"):
            break
        if line.startswith("glancefs/"):
            path = line.split()[0].strip("/")
            container = layers.setdefault(path.replace("/", "."), [])
            continue
        if not line.startswith("  ") or line.startswith("   ") or container is None:
            continue  # a description going on, a blank line, or text before the first container
        words = re.split(r"─|\s{2,}", line.strip(), maxsplit=1)[0].strip()
        match = MODULES.fullmatch(words)
        if match is None:
            raise ValueError(f"line {number + 1}: not a layer's modules: {words!r}")
        pending, pending_line = f"{pending} {words}", pending_line or number + 1
        if words[-1] in "|:":
            continue
        container.append(Layer.parse(pending, pending_line))
        pending, pending_line = "", 0
    return layers


def compare_layers(
    contracts: dict[str, list[Layer]], picture: dict[str, list[Layer]], picture_name: str
) -> Iterator[str]:
    """What differs between the contracts' layers and the picture's, one line each."""
    for container in sorted(contracts.keys() - picture.keys()):
        yield f"{picture_name}: {container} has layers in pyproject.toml but not in the picture"
    for container in sorted(picture.keys() - contracts.keys()):
        yield f"{picture_name}: {container} is in the picture but has no layers contract"
    for container in sorted(contracts.keys() & picture.keys()):
        yield from _compare_container(container, contracts[container], picture[container],
                                      picture_name)  # fmt: skip


def _compare_container(
    container: str, declared: list[Layer], drawn: list[Layer], picture_name: str
) -> Iterator[str]:
    declared_at = _positions(declared)
    drawn_at = _positions(drawn)
    where = f"{picture_name}:{drawn[0].line if drawn else 0}"
    for module in sorted(declared_at.keys() | drawn_at.keys()):
        name = f"{container}.{module}"
        if module not in drawn_at:
            yield f"{where}: {name} is in pyproject.toml's layers, not in the picture"
        elif module not in declared_at:
            line = drawn[drawn_at[module]].line
            yield f"{picture_name}:{line}: {name} is in the picture, not in pyproject.toml's layers"
        elif declared_at[module] != drawn_at[module]:
            layer = drawn[drawn_at[module]]
            yield (
                f"{picture_name}:{layer.line}: {name} is in layer {drawn_at[module] + 1} "
                f"({layer.text()}), in pyproject.toml in layer {declared_at[module] + 1} "
                f"({declared[declared_at[module]].text()})"
            )
    for index, (ours, theirs) in enumerate(zip(declared, drawn, strict=False)):
        if ours.modules == theirs.modules and ours.text() != theirs.text():
            yield (
                f"{picture_name}:{theirs.line}: layer {index + 1} of {container} is "
                f"{theirs.text()}, in pyproject.toml {ours.text()}"
            )


def _positions(layers: Iterable[Layer]) -> dict[str, int]:
    return {module: index for index, layer in enumerate(layers) for module in layer.modules}


def check_layers(root: Path) -> Iterator[str]:
    picture_name = "ARCHITECTURE.md"
    try:
        picture = layers_in_picture((root / picture_name).read_text())
    except ValueError as error:
        yield f"{picture_name}: {error}"
        return
    yield from compare_layers(layers_in_pyproject(root / "pyproject.toml"), picture, picture_name)


def check(root: Path) -> list[str]:
    """Every problem found under ``root``, one line each."""
    return [*check_names(root), *check_layers(root)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.doccheck", description=__doc__)
    parser.add_argument("root", nargs="?", type=Path, default=Path.cwd(), help="the repository")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    sys.path.insert(0, str(root))  # the tree as it is, before any installed copy
    problems = check(root)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
