"""The device side needs no server runtime, and the import graph is the one docs/architecture.md draws.

A phone that reaches its body over the network must not load the scheduler, tensor parallel or the
server (issue 23). The import-graph block of docs/architecture.md is checked against the code's
module-level imports, so the picture cannot drift.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "src" / "lambdasplit"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
GRAPH_START, GRAPH_END = "<!-- import-graph:start -->", "<!-- import-graph:end -->"
SERVER_SIDE = ("engine", "cloud", "diffusion.cloud")
# What runs on the device: the public API, the body connection, split diffusion's device part,
# the gateway and the UI.
DEVICE_API = """
import lambdasplit
from lambdasplit import SplitModelForCausalLM, SplitRuntime, generate_ids
import lambdasplit.device.connect, lambdasplit.diffusion.device, lambdasplit.gateway.app, lambdasplit.ui.app
"""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _node(module: str) -> str:
    """The graph's name for a module: its subpackage (split diffusion by side), or the module."""
    parts = module.split(".")[1:]
    if not parts:
        return "lambdasplit"
    if parts[0] == "diffusion" and len(parts) > 1 and parts[1] in ("device", "cloud"):
        return f"diffusion.{parts[1]}"
    return parts[0]


def _imports(tree: ast.Module, lazy: bool) -> set[str]:
    """The lambdasplit modules a file imports: at import time only, or also inside functions and
    `if TYPE_CHECKING:` blocks (`lazy`)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if not lazy and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return
        if not lazy and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lambdasplit."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lambdasplit":
            # `from lambdasplit import defaults` names a module; `from lambdasplit.x import Y`, a name in x.
            submodules = [f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")]
            found.update(submodules or [node.module])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _module_graph(lazy: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        graph[_module_name(path)] = _imports(ast.parse(path.read_text()), lazy)
    return graph


def package_graph() -> dict[str, set[str]]:
    """Which part of the package imports which, at import time (the package's `__init__` aside)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in _module_graph(lazy=False).items():
        source = _node(module)
        if source == "lambdasplit":
            continue
        edges[source].update(t for t in map(_node, targets) if t not in (source, "lambdasplit"))
    return edges


def render(edges: dict[str, set[str]]) -> str:
    width = max(map(len, edges))
    return "\n".join(f"{source:<{width}} ──▶ {', '.join(sorted(targets))}" for source, targets in sorted(edges.items()) if targets)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_importing_the_device_api_loads_no_engine_and_no_server():
    """In a fresh interpreter: the device API loads no `lambdasplit.engine` / `lambdasplit.cloud`
    module; asking for a local body then loads the engine (and the public names still work)."""
    script = DEVICE_API + """
import json, sys
before = sorted(m for m in sys.modules if m.startswith(("lambdasplit.engine", "lambdasplit.cloud", "lambdasplit.diffusion.cloud")))
from lambdasplit import LocalBody, load_local_body
print(json.dumps({"before": before, "after": "lambdasplit.engine.scheduler" in sys.modules, "local": LocalBody.__module__}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"before": [], "after": True, "local": "lambdasplit.engine.local"}


def test_device_side_modules_import_nothing_of_the_server_not_even_lazily_except_for_a_local_body():
    """No device-side module imports the engine or the cloud at import time; inside functions only
    `engine.local` (the in-process body) and split diffusion's own cloud part, when asked for."""
    wrong, lazy = [], []
    eager_graph, lazy_graph = _module_graph(lazy=False), _module_graph(lazy=True)
    for module in eager_graph:
        if _node(module) not in ("device", "diffusion.device", "gateway", "ui", "split", "wire"):
            continue
        wrong += [f"{module} -> {t}" for t in eager_graph[module] if _node(t) in SERVER_SIDE]
        lazy += [t for t in lazy_graph[module] - eager_graph[module] if _node(t) in SERVER_SIDE]
    assert wrong == []
    assert set(lazy) <= {"lambdasplit.engine.local", "lambdasplit.engine.scheduler", "lambdasplit.diffusion.cloud"}


def test_device_modules_import_each_other_one_way():
    """No circle inside device/, counting imports in functions and under TYPE_CHECKING too (the old
    generation -> model -> runtime -> generation)."""
    graph = {m: {t for t in ts if t.startswith("lambdasplit.device.")}
             for m, ts in _module_graph(lazy=True).items() if m.startswith("lambdasplit.device.")}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_package_graph_has_no_circle_and_is_the_one_docs_architecture_draws():
    edges = package_graph()
    assert _cycle(edges) is None, " -> ".join(_cycle(edges) or [])
    for side in ("device", "diffusion.device", "gateway", "ui"):
        assert not edges[side] & set(SERVER_SIDE), f"{side} imports {edges[side] & set(SERVER_SIDE)}"
    text = ARCHITECTURE.read_text()
    drawn = text.partition(GRAPH_START)[2].partition(GRAPH_END)[0].strip().removeprefix("```text").removesuffix("```").strip()
    assert drawn == render(edges), (
        f"docs/architecture.md's import graph differs from the code's imports; between the {GRAPH_START} "
        f"markers it should read:\n```text\n{render(edges)}\n```"
    )


def test_the_scheduler_module_schedules_and_loads_no_model():
    """engine/scheduler.py neither loads a model (`split.load`) nor bootstraps tensor parallel
    (`engine.parallel`), not even inside a function: both are engine/loading.py's."""
    imports = _module_graph(lazy=True)["lambdasplit.engine.scheduler"]
    assert imports & {"lambdasplit.split.load", "lambdasplit.engine.parallel"} == set()
