"""Imports run one way (docs/architecture.md): only to lower layers or within a package.

Every `import` in gateway/ is read with `ast` (including imports inside
functions and under TYPE_CHECKING: an upward import is a cycle waiting to
happen either way), and the operator's real imports are taken from a fresh
interpreter, since what it must not pull in is transitive.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = ROOT / "gateway"

# Lower rank = lower layer. A module may import a package of lower rank, or its own package.
RANK = {
    "gateway.config": 0,
    "gateway.protocol": 0,
    "gateway.cluster": 1,
    "gateway.telemetry": 1,
    "gateway.security": 2,
    "gateway.broker": 3,
    "gateway.core": 4,
    "gateway.sdk": 5,
    "gateway.demo": 5,
    "gateway.handlers": 6,
    "gateway.feed": 6,  # a publisher: it goes through gateway.sdk
    "gateway.app": 7,
    "gateway.server": 8,
    "gateway.cli": 9,
    "gateway.__main__": 10,
}


def part(module: str) -> str:
    """The layer unit a module belongs to: its package (gateway.x) or top-level module."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    names = list(rel.parts)
    if names[-1] == "__init__":
        names.pop()
    return ".".join(names)


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "gateway":  # a submodule, or an attribute of the root
                found += [
                    (node.lineno, f"gateway.{a.name}" if _is_module(a.name) else "gateway")
                    for a in node.names
                ]
            else:
                found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.startswith("gateway")]


def _is_module(name: str) -> bool:
    return (GATEWAY / name).is_dir() or (GATEWAY / f"{name}.py").is_file()


MODULES = sorted(p for p in GATEWAY.rglob("*.py") if p != GATEWAY / "__init__.py")


def test_every_gateway_package_has_a_layer():
    units = {part(module_name(p)) for p in MODULES}
    missing = units - set(RANK)
    assert not missing, f"give these a layer in RANK and docs/architecture.md: {missing}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_higher_layer(path: Path):
    source = part(module_name(path))
    upward = [
        f"line {line}: {name}"
        for line, name in imports_of(path)
        if name != "gateway" and part(name) != source and RANK[part(name)] >= RANK[source]
    ]
    assert not upward, f"{source} (layer {RANK[source]}) imports upward: {upward}"


def test_the_package_root_imports_nothing():
    """Everything imports `gateway` first: it must stay a docstring and a version."""
    assert imports_of(GATEWAY / "__init__.py") == []


def test_the_operator_imports_only_the_cluster_contract():
    """The operator reads the fleet through gateway.cluster; engines, core and config stay out."""
    code = (
        "import sys, pkgutil, importlib, herald_operator\n"
        "for m in pkgutil.iter_modules(herald_operator.__path__):\n"
        "    importlib.import_module('herald_operator.' + m.name)\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('gateway'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    assert "gateway.cluster.redis" in out  # it does read the registry through the contract
    outside = [m for m in out if part(m) not in ("gateway", "gateway.cluster", "gateway.protocol")]
    assert outside == [], f"the operator pulls in {outside}"
    assert "gateway.protocol.errors" in out and len([m for m in out if "protocol" in m]) <= 2
