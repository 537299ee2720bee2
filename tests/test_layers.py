"""Every import arrow in the package points down the layers, and there are no import cycles.

The layers (README, "Architecture"), lowest first. A module may import its own layer or any
below it, at module level or inside a function alike.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "muvi"

#: prefix -> layer (the longest matching prefix wins)
LAYERS = {
    "muvi.errors": 0, "muvi.config": 0, "muvi.media": 0, "muvi.memory": 0,
    "muvi.checkpoint": 1, "muvi.video": 1, "muvi.flow": 1, "muvi.mux": 1, "muvi.output": 1,
    "muvi.windows": 1, "muvi.loudness": 1, "muvi.release": 1, "muvi.profiling": 1,
    "muvi.data": 2,
    "muvi.models": 3,
    "muvi.encoders": 4,
    "muvi.hub": 5,
    "muvi.eval": 6, "muvi.training": 6, "muvi.inputs": 6,
    "muvi.pipeline": 7,
    "muvi": 8, "muvi.cli": 8, "muvi.app": 8, "muvi.eval.__main__": 8, "muvi.__main__": 8,
}


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str) -> str:
    """``muvi.x.y`` → the module it names (``muvi.x`` when ``y`` is a name inside it)."""
    parts = name.split(".")
    while len(parts) > 1:
        base = PACKAGE.parent.joinpath(*parts)
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return "muvi"


def imports(path: Path) -> set[str]:
    """Every muvi module ``path`` imports, anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {_resolve(a.name) for a in node.names if a.name.split(".")[0] == "muvi"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "muvi":
            out |= {_resolve(f"{node.module}.{a.name}") for a in node.names}
    return out


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    return {module_name(p): imports(p) - {module_name(p)} for p in sorted(package.rglob("*.py"))}


def upward_arrows(package: Path = PACKAGE) -> list[str]:
    return sorted(f"{a} (layer {layer(a)}) -> {b} (layer {layer(b)})"
                  for a, targets in graph(package).items() for b in targets if layer(b) > layer(a))


def test_every_import_points_down_the_layers():
    assert upward_arrows() == []


def test_every_module_has_a_layer():
    assert all(layer(m) is not None for m in graph())


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
