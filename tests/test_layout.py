"""The package's stages import one way (DESIGN.md: the pipeline): a lower stage never imports a
higher one, at module level or inside a function. io reads and writes files; walk analyses one
graph; permute rewrites weights; match is numpy on the groups; verify runs ONNX Runtime; resync
chains them; audit puts vendor files in canonical form and calls resync; the API is the front door
that commands and the demo call."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "onnx_resync"

# stage -> the stages it may import (itself always allowed)
ALLOWED = {
    "errors": set(),
    "jsonable": set(),
    "io": {"errors"},
    "walk": {"io", "errors"},
    "permute": {"walk", "io", "errors", "jsonable"},
    "match": {"walk", "permute", "io", "errors"},
    "runtime": {"io", "errors"},
    "inputs": {"walk", "runtime", "io", "errors"},
    "verify": {"runtime", "inputs", "io", "errors", "jsonable"},
    "reduce": {"match", "permute", "walk", "verify", "runtime", "inputs", "io", "errors", "jsonable"},
    "resync": {"reduce", "match", "permute", "walk", "verify", "runtime", "inputs", "io", "errors", "jsonable"},
    "audit": {"reduce", "resync", "match", "permute", "walk", "verify", "runtime", "inputs", "io", "errors", "jsonable"},
    "api": {"audit", "reduce", "resync", "match", "permute", "walk", "verify", "runtime", "inputs", "io", "errors",
            "jsonable"},
    "demo": {"api", "resync", "walk", "verify", "runtime", "io", "errors", "jsonable"},
    "commands": {"api", "demo", "errors", "jsonable"},
    "cli": {"commands", "errors", "__init__"},
    "__main__": {"cli"},
    "__init__": set(),
}


def _stage(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path, root: Path = PACKAGE) -> list[tuple[str, int]]:
    """(imported stage, line) for every import of the package's own modules in `path`."""
    tree = ast.parse(path.read_text())
    depth = len(path.relative_to(root).parts) - 1  # folders below the package root
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.split(".")[0] == "onnx_resync":
                    parts = node.module.split(".")[1:]
                    names = parts[:1] or [a.name for a in node.names]
                else:
                    continue
            else:
                up = node.level - 1
                if up < depth:  # relative to a folder inside the stage: the same stage
                    continue
                parts = (node.module or "").split(".") if node.module else []
                names = parts[:1] if parts and parts[0] else [a.name for a in node.names]
            found.extend((n, node.lineno) for n in names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "onnx_resync" and len(a.name.split(".")) > 1:
                    found.append((a.name.split(".")[1], node.lineno))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_stage_is_declared():
    stages = {_stage(p) for p in MODULES}
    assert stages <= set(ALLOWED), f"declare the new stage(s) in ALLOWED: {sorted(stages - set(ALLOWED))}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_one_way(path):
    stage = _stage(path)
    wrong = [(name, line) for name, line in _imports(path)
             if name != stage and name in ALLOWED and name not in ALLOWED[stage]]
    assert not wrong, f"{path.relative_to(PACKAGE)} ({stage}) imports a higher stage: {wrong}"


def test_the_check_can_fail(tmp_path):
    """A lower stage importing a higher one, inside a function, is caught (the test is not vacuous)."""
    path = tmp_path / "onnx_resync" / "walk" / "graph.py"
    path.parent.mkdir(parents=True)
    path.write_text((PACKAGE / "walk" / "graph.py").read_text() + "\n\ndef _x():\n    from ..resync import resync\n")
    assert "resync" in [name for name, _ in _imports(path, tmp_path / "onnx_resync")]
    assert "resync" not in ALLOWED["walk"]
