"""The pack's imports point down and never loop: read from the source, module-level and deferred imports alike.

Layers, top to bottom (docs/architecture.md): a module imports its own layer or lower ones only.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("", "nodes", "cli", "api", "zoom", "upscalers", "imaging", "tiling", "assets", "runtime")  # "" = the root
COMFY_MODULES = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "execution", "nodes")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _pack_files() -> dict[str, Path]:
    files = {}
    for path in REPO.glob("**/*.py"):
        top = path.relative_to(REPO).parts[0]
        if top in LAYERS or path.parent == REPO:
            files[_module_name(path)] = path
    return files


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(pack modules `name` imports, absolute top-level names it imports) -- every import statement, wherever."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "":
        package = []
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            outside.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            outside.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            target = ".".join(base)
            for alias in node.names:  # `from . import bridge` names a module; `from .x import y` names x
                full = f"{target}.{alias.name}".strip(".")
                inside.add(full if full in modules else target)
    inside.discard(name)
    return {m for m in inside if m in modules}, outside


def _graph():
    modules = _pack_files()
    graph, external = {}, {}
    for name, path in modules.items():
        graph[name], external[name] = _imports(name, path, modules)
    return graph, external


def _layer(module: str) -> int:
    top = module.split(".")[0]
    return LAYERS.index(top if top in LAYERS else "")


def test_the_graph_is_read():
    graph, _ = _graph()
    assert len(graph) > 80 and "upscalers.upscale" in graph["api"] and "upscalers.contract" in graph["upscalers.backends"]


def test_imports_point_down():
    graph, _ = _graph()
    upward = [f"{m} -> {t}" for m, targets in graph.items() for t in targets if _layer(t) < _layer(m)]
    assert not upward, "imports that point up a layer (move the shared code down): " + "; ".join(sorted(upward))


def test_no_import_cycles():
    graph, _ = _graph()
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"modules importing each other (directly or round a loop): {cycles}"


def test_only_the_bridge_imports_comfyui():
    _, external = _graph()
    talking = sorted(m for m, names in external.items() if set(names) & set(COMFY_MODULES)
                     and not m.startswith("nodes.bridge"))
    assert not talking, f"only nodes/bridge/ may import ComfyUI's modules; also: {talking}"


def test_node_families_share_only_the_bridge_and_the_shared_inputs():
    graph, _ = _graph()
    allowed = {"nodes.shared_inputs"}
    crossing = [f"{m} -> {t}" for m, targets in graph.items() if m.startswith("nodes.") and not m.startswith("nodes.bridge")
                and m != "nodes.shared_inputs" for t in targets
                if t.startswith("nodes") and not t.startswith("nodes.bridge") and t not in allowed]
    assert not crossing, f"a node family imports another: {crossing}"


def test_backends_run_without_comfyui():
    _, external = _graph()
    below_nodes = sorted(m for m, names in external.items() if _layer(m) > LAYERS.index("nodes")
                         and set(names) & set(COMFY_MODULES))
    assert not below_nodes, f"backends must import without ComfyUI: {below_nodes}"
