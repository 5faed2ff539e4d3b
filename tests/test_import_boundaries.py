"""Arrows point down only (DESIGN.md's layout): the folders import each other only as the table allows.

Checked twice: statically, over every import statement of every module (function-level lazy imports
included, so an import deferred for speed cannot hide a wrong arrow), and by importing in a fresh
interpreter (what a module pulls in at run time, third-party packages included).

    coordinator/ ─┐                 worker/ ─┐
                  ├─▶ common/  swarm/ ◀──────┤
                  └─▶ fusion/   lm/   ◀──────┘        every folder ─▶ proto/
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("proto", "common", "swarm", "fusion", "lm", "coordinator", "worker")

#: which coldswarm packages each package may import (besides itself)
MAY_IMPORT = {
    "proto": set(),
    "common": {"proto"},
    "swarm": {"common", "proto"},
    "fusion": {"common"},
    "lm": {"common"},
    "coordinator": {"common", "swarm", "fusion", "lm", "proto"},
    "worker": {"common", "swarm", "fusion", "lm", "proto"},
}
#: third-party packages a package must not import
MUST_NOT_IMPORT = {
    "fusion": {"grpc", "grpc_tools", "hivemind"},
    "lm": {"grpc", "grpc_tools", "hivemind"},
    "swarm": set(),
}
#: the only third-party package common/ may import (it also imports coldswarm.proto)
COMMON_THIRD_PARTY = {"grpc"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["coldswarm", *parts])


def parse_imports(source: str, name: str, is_package: bool) -> frozenset[str]:
    """Absolute names of everything module ``name`` imports, wherever the statement stands."""
    package = name if is_package else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            # `from coldswarm.common import options` imports the module coldswarm.common.options
            names.update(f"{target}.{alias.name}" for alias in node.names if target.startswith("coldswarm"))
    return frozenset(names)


def import_graph() -> dict[str, frozenset[str]]:
    """{module: what it imports} for every module of every package."""
    graph = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = module_name(path)
            graph[name] = parse_imports(path.read_text(), name, path.name == "__init__.py")
    return graph


def package_of(name: str) -> str | None:
    """``common`` for ``coldswarm.common.options``; None for a name outside coldswarm."""
    parts = name.split(".")
    return parts[1] if parts[0] == "coldswarm" and len(parts) > 1 else None


def is_stdlib(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names


def third_party_closure(
    name: str, graph: dict[str, frozenset[str]], seen: set[str] | None = None
) -> set[str]:
    """The non-stdlib packages that importing coldswarm module ``name`` pulls in (through coldswarm modules)."""
    seen = set() if seen is None else seen
    if name in seen or name not in graph:
        return set()
    seen.add(name)
    found = set()
    for target in graph[name]:
        if package_of(target) is not None:
            found |= third_party_closure(target, graph, seen)
        elif not is_stdlib(target):
            found.add(target.split(".")[0])
    return found


def violations(graph: dict[str, frozenset[str]]) -> list[str]:
    bad = []
    for name, imported in graph.items():
        own = package_of(name)
        for target in imported:
            other, top = package_of(target), target.split(".")[0]
            if other is not None and other != own and other not in MAY_IMPORT[own]:
                bad.append(f"{name} imports {target}: {own}/ must not import {other}/")
            if other is None and top in MUST_NOT_IMPORT.get(own, ()):
                bad.append(f"{name} imports {target}: {own}/ must not import {top}")
            if own == "common" and other is None and not is_stdlib(target) and top not in COMMON_THIRD_PARTY:
                bad.append(f"{name} imports {target}: common/ imports only the standard library and grpc")
            # fusion/ and lm/ may use only the standard-library pieces of common/ (never its gRPC ones).
            if own in ("fusion", "lm") and other == "common" and target in graph:
                pulled = third_party_closure(target, graph)
                if pulled:
                    bad.append(
                        f"{name} imports {target}, which is not standard-library only ({sorted(pulled)})"
                    )
    return bad


def test_every_package_is_seen_with_its_lazy_imports():
    graph = import_graph()
    for package in PACKAGES:
        assert f"coldswarm.{package}" in graph, f"{package}/ has no __init__.py"
    # The parser sees lazy imports: coordinator/cli.py imports grpc inside a function.
    assert "grpc" in graph["coldswarm.coordinator.cli"]
    assert "coldswarm.common.options" in graph["coldswarm.fusion.methods"]


def test_no_import_points_up_or_across():
    bad = violations(import_graph())
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "package, source, wrong",
    [
        ("coordinator", "from coldswarm.worker.swarm import SwarmConfig", "must not import worker/"),
        (
            "worker",
            "def f():\n    from coldswarm.coordinator import rounds\n",
            "must not import coordinator/",
        ),
        ("common", "import coldswarm.coordinator.config", "must not import coordinator/"),
        ("swarm", "from coldswarm.worker import daemon", "must not import worker/"),
        ("common", "import torch", "only the standard library and grpc"),
        ("common", "import numpy as np", "only the standard library and grpc"),
        ("common", "def f():\n    import hivemind\n", "only the standard library and grpc"),
        ("fusion", "from coldswarm.coordinator import merge", "must not import coordinator/"),
        ("fusion", "from coldswarm.swarm import records", "must not import swarm/"),
        ("fusion", "import grpc", "must not import grpc"),
        ("fusion", "from ..worker import session", "must not import worker/"),
        ("lm", "from coldswarm.worker import jobs", "must not import worker/"),
        ("lm", "from coldswarm.common.channel import open_channel", "not standard-library only"),
    ],
)
def test_each_wrong_arrow_is_caught(package, source, wrong):
    """The checker itself: a wrong import, as if it stood in a module of ``package``, is reported."""
    graph = import_graph()
    name = f"coldswarm.{package}._boundary_probe"
    graph[name] = parse_imports(source, name, is_package=False)
    assert any(wrong in v and v.startswith(name) for v in violations(graph)), f"{package}: {source!r}"


def _fresh_import(modules_code: str) -> str:
    script = (
        "import importlib, pkgutil, sys\n"
        f"{modules_code}\n"
        "print('LOADED', sorted({m.split('.')[0] for m in sys.modules} | "
        "{m for m in sys.modules if m.startswith('coldswarm.')}))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("LOADED "))
    return line


def _import_all(package: str) -> str:
    return (
        f"import coldswarm.{package} as p\n"
        f"for m in pkgutil.iter_modules(p.__path__): importlib.import_module('coldswarm.{package}.' + m.name)\n"
    )


def test_importing_common_loads_no_training_stack_and_no_role():
    loaded = _fresh_import(_import_all("common"))
    for name in ("'torch'", "'numpy'", "'hivemind'", "'transformers'", "'peft'"):
        assert name not in loaded, f"importing coldswarm.common loaded {name}: {loaded}"
    for role in ("coldswarm.coordinator", "coldswarm.worker", "coldswarm.swarm", "coldswarm.fusion"):
        assert f"'{role}" not in loaded, f"importing coldswarm.common loaded {role}"


def test_importing_fusion_loads_no_grpc_and_no_role():
    loaded = _fresh_import(_import_all("fusion"))
    for name in ("'grpc'", "'hivemind'", "'coldswarm.coordinator", "'coldswarm.worker", "'coldswarm.swarm"):
        assert name not in loaded, f"importing coldswarm.fusion loaded {name}"


def test_importing_swarm_loads_no_role():
    loaded = _fresh_import(_import_all("swarm"))
    for role in ("'coldswarm.coordinator", "'coldswarm.worker"):
        assert role not in loaded, f"importing coldswarm.swarm loaded {role}"


@pytest.mark.parametrize("folder, other", [("coordinator", "worker"), ("worker", "coordinator")])
def test_no_role_names_the_other_anywhere(folder, other):
    """The issue's own check, as grep runs it (``grep -rn "coldswarm.worker" coordinator/``, the dot matching any
    character): not even a string (``importlib.import_module("coldswarm.worker...")``) or a doc names the other
    role's modules, so no lazy or dynamic import can hide from the AST check above."""
    import re

    pattern = re.compile(rf"coldswarm.{other}")
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / folder).rglob("*"))
        if path.is_file() and path.suffix in {".py", ".md", ".txt", ".toml", ".cfg", ".html", ".js"}
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, "\n".join(hits)
