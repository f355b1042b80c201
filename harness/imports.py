"""The package's own imports, read from its source (no module is imported): the layers they must
follow, and the files a piece of code is made of (the digests that say which code made a record).

Every import of a harness module counts, at the top of a file or inside a function: a function's
import is as much a part of what the code does as a module's.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent

# The layers, lowest first: a module imports only modules of lower layers, or of its own layer where
# they do not import it back (tests/test_imports.py). A name ending in "." is a folder and everything
# in it; a more specific name (engines.arguments) takes its module out of its folder's layer.
LAYERS = ("facts", "blocks and records", "step", "experiment files", "engines", "measure", "predict", "report", "lab",
          "command line")
_MEMBERS = {
    "facts": ("harness.errors", "harness.imports", "harness.env", "harness.presets", "harness.architectures",
              "harness.model_files", "harness.claims", "harness.cards"),
    # What the lab knows of each building block, their names in Trainer's arguments, and the record format
    # (a configuration's identity leaves out each optimizer setting at its default).
    # What a card holds beside the tensors asks the quantization's descriptor for its kernels.
    "blocks and records": ("harness.blocks.", "harness.techniques", "harness.engines.arguments", "harness.schema",
                           "harness.device_memory"),
    # What builds and runs a step knows no experiment file: it is handed the resolved experiment.
    "step": ("harness.step.",),
    "experiment files": ("harness.config", "harness.arguments", "harness.matrix"),
    "engines": ("harness.engines.",),
    "measure": ("harness.measure.",),
    "predict": ("harness.predict.",),
    # The report reads results/ only; it stands above what made them so that lab/microbench may print its table.
    "report": ("harness.report.",),
    "lab": ("harness.lab.",),
    "command line": ("harness", "harness.cli", "harness.__main__"),
}


def _matches(name: str, member: str) -> bool:
    return name == member.rstrip(".") or (member.endswith(".") and name.startswith(member))


def layer_of(name: str) -> int | None:
    """The index in LAYERS of a harness module (by its dotted name), by its most specific member."""
    found = [(len(member), LAYERS.index(layer)) for layer, members in _MEMBERS.items() for member in members
             if _matches(name, member)]
    return max(found)[1] if found else None


@cache
def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a folder's __init__ is the folder's name)."""
    files = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        parts = ("harness",) + path.relative_to(PACKAGE_ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


@cache
def harness_imports() -> dict[str, frozenset[str]]:
    """Each module's imports of other harness modules (`from harness.x import y` is harness.x.y
    where y is a module, else harness.x)."""
    files = module_files()
    graph = {}
    for name, path in files.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("harness"):
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    imported.add(submodule if submodule in files else node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names if alias.name.startswith("harness"))
        graph[name] = frozenset(imported & set(files) - {name})
    return graph


def source_files(*names: str) -> tuple[str, ...]:
    """The files (relative to the package) of the named modules and of every harness module they
    import, directly or not: the code a result of theirs depends on."""
    graph, seen, todo = harness_imports(), set(), list(names)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    files = module_files()
    return tuple(sorted(files[name].relative_to(PACKAGE_ROOT).as_posix() for name in seen))
