"""The layering the architecture promises (docs/architecture.md), checked on the source.

Arrows point one way: `engine` at the bottom imports no other part; `kv_transfer` only
`engine`; the shared `worker` base `engine` and `kv_transfer`; the two worker kinds never
each other; the router the workers only inside `WorkerPools._spawn`; nothing the composition root
(`pdserve/`) or the tests. The pure-policy modules import with torch, Ray, gRPC and numpy
made unimportable."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
PARTS = {name.split(".", 1)[1]: ROOT / folder for name, folder in PACKAGE_DIRS.items() if "." in name}
ROOT_PACKAGE = ROOT / PACKAGE_DIRS["pdserve"]

# part -> the parts it may import (itself always)
ALLOWED = {
    "engine": set(),
    "kv_transfer": {"engine"},
    "worker": {"engine", "kv_transfer"},
    "prefill_worker": {"engine", "kv_transfer", "worker"},
    "decode_worker": {"engine", "kv_transfer", "worker"},
    "router": {"engine"},
    "bench": {"engine", "kv_transfer", "worker", "router"},
}
# the router may import the worker kinds only here, to spawn them
SPAWN = ("router/workers.py", "WorkerPools._spawn", {"prefill_worker", "decode_worker"})


def _imports(path: Path):
    """(imported module, qualified name of the enclosing function or '') for every import in `path`."""
    tree = ast.parse(path.read_text(), str(path))

    def walk(node, scope):
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{scope}.{child.name}" if scope else child.name
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, scope
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                yield child.module, scope
                if child.module == "pdserve":  # `from pdserve import engine`
                    for alias in child.names:
                        yield f"pdserve.{alias.name}", scope
            elif isinstance(child, ast.ImportFrom) and child.level:
                raise AssertionError(f"{path}: relative import (use the pdserve.* namespace)")
            yield from walk(child, inner)

    yield from walk(tree, "")


def _sources(folder: Path):
    return [p for p in folder.rglob("*.py") if "_pb2" not in p.name]


BARE = set(PARTS) | {"tests", "conftest"}


def _violations(parts: dict[str, Path] = PARTS, root: Path = ROOT) -> list[str]:
    bad = []
    for part, folder in parts.items():
        for path in _sources(folder):
            rel = path.relative_to(root).as_posix()
            for module, scope in _imports(path):
                top, _, rest = module.partition(".")
                if top in BARE:
                    bad.append(f"{rel}: bare `{module}` (the namespace is pdserve.*)")
                    continue
                if top != "pdserve" or not rest:
                    continue
                target = rest.split(".")[0]
                if target == part:
                    continue
                if target not in PARTS:
                    bad.append(f"{rel}: imports the composition root (`{module}`)")
                elif target not in ALLOWED[part] and not (
                        (rel, scope) == SPAWN[:2] and target in SPAWN[2]):
                    bad.append(f"{rel} ({scope or 'module'}): {part} -> {target} (`{module}`)")
    return bad


def test_every_part_is_checked():
    assert set(ALLOWED) == set(PARTS), "a new part needs its row in ALLOWED"
    assert all(_sources(folder) for folder in PARTS.values())


def test_arrows_point_one_way():
    assert _violations() == []


def test_the_checker_catches_a_forbidden_arrow(tmp_path):
    """The check itself can fail: an engine module importing the router, or a bare package, is reported."""
    fake = tmp_path / "engine"
    fake.mkdir()
    (fake / "bad.py").write_text("from pdserve.router.server import Router\nimport engine.config\n")
    found = _violations({"engine": fake}, tmp_path)
    assert any("engine -> router" in v for v in found) and any("bare `engine.config`" in v for v in found)


def test_nothing_imports_the_composition_root_or_the_tests():
    for module, _ in (m for folder in PARTS.values() for p in _sources(folder) for m in _imports(p)):
        assert not module.startswith(("pdserve.cli", "pdserve.serve", "tests")), module


TORCH_FREE = ["pdserve.engine.scheduler", "pdserve.engine.block_manager", "pdserve.engine.config",
              "pdserve.engine.sequence", "pdserve.engine.sampling", "pdserve.engine.messages",
              "pdserve.engine.simulator", "pdserve.kv_transfer.reservations", "pdserve.kv_transfer.errors",
              "pdserve.router.protocol", "pdserve.router.pools", "pdserve.router.admission",
              "pdserve.router.prefix_index", "pdserve.router.planner", "pdserve.bench.plan"]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_pure_modules_import_without_torch_or_ray(module):
    """Imported in a fresh interpreter where importing torch, ray, grpc or numpy raises."""
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "ray", "grpc", "numpy"):
            raise ImportError(f"{{name}} is blocked")
sys.meta_path.insert(0, Block())
import {module}
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
