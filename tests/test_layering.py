"""The package's import structure: module-level imports form no cycle, and the packages stack one way
(core <- kernels <- layers <- models <- measure <- explore, teach; run on models + data; nothing below imports an
explorer or a lesson at module level). Imports inside functions (lazy, for optional extras or heavy modules) are not counted."""
import ast
from pathlib import Path

KIT = Path(__file__).resolve().parents[1] / "kit"
CORE = {"kit", "kit._compat", "kit._io", "kit.groups", "kit.reps", "kit.lie", "kit.fields", "kit.equivariance"}
# each package and what it may import at module level (besides itself and the core); explore is the top
MAY_IMPORT = {
    "kit.kernels": (),
    "kit.layers": ("kit.kernels",),
    "kit.models": ("kit.kernels", "kit.layers"),
    "kit.data": (),
    "kit.measure": ("kit.kernels", "kit.layers", "kit.models", "kit.data"),
    "kit.run": ("kit.kernels", "kit.layers", "kit.models", "kit.data", "kit.measure"),
}


def _module(path: Path) -> str:
    parts = path.relative_to(KIT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports() -> dict[str, set[str]]:
    mods = {_module(p): p for p in KIT.rglob("*.py")}
    graph = {}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.parse(path.read_text()).body:                    # module level only
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                cands = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kit"):
                cands = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names if a.name.startswith("kit")]
            else:
                continue
            deps |= {c for c in cands if c in mods and c != mod}
        graph[mod] = deps
    return graph


def test_module_level_imports_have_no_cycle():
    graph, state, cycles = _top_level_imports(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in graph[m]:
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"
    for m in graph:
        if m not in state:
            visit(m, [m])
    # a package importing its own submodules (kit.layers -> kit.layers.base) is not a cycle by itself;
    # only a cycle that comes back through another module counts
    def internal(c):
        return any(all(x == top or x.startswith(top + ".") for x in c) for top in c)
    real = [c for c in cycles if not internal(c)]
    assert not real, real


def _package(m: str) -> str:
    return ".".join(m.split(".")[:2])


def test_layers_stack_one_way():
    """core <- kernels <- layers <- models <- measure <- explore; run depends on models + data (and what
    they stand on); nothing but the CLI imports an explorer."""
    graph = _top_level_imports()
    packages = {_package(m) for m in graph if m not in CORE}
    top = {"kit.explore", "kit.teach", "kit.__main__"}
    assert packages == set(MAY_IMPORT) | top, packages    # no flat module left
    for m, deps in graph.items():
        if m in CORE:
            assert deps <= CORE, (m, deps - CORE)
            continue
        pkg = _package(m)
        if pkg in MAY_IMPORT:
            allowed = {pkg, *MAY_IMPORT[pkg]}
            bad = {d for d in deps if d not in CORE and _package(d) not in allowed}
            assert not bad, (m, bad)
        if pkg not in top:
            assert not any(_package(d) in ("kit.explore", "kit.teach") for d in deps), (m, deps)
        if pkg == "kit.explore":                                   # the labs do not need the lessons
            assert not any(_package(d) == "kit.teach" for d in deps), (m, deps)
