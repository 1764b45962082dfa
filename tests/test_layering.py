"""The package's import structure: module-level imports form no cycle, and the layers stack one way
(core <- kernels <- layers <- models <- measuring / running <- explorers; nothing below imports an explorer at
module level). Imports inside functions (lazy, for optional extras or heavy modules) are not counted."""
import ast
from pathlib import Path

KIT = Path(__file__).resolve().parents[1] / "kit"
CORE = {"kit._compat", "kit._io", "kit.timing", "kit.groups", "kit.reps", "kit.fields", "kit.lie"}
EXPLORERS = {"kit.viz", "kit.widgets", "kit.lab", "kit.primer", "kit.redundancy", "kit.e4viz", "kit.pdoviz", "kit.epdoviz",
             "kit.separable_lab"}


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
    real = [c for c in cycles if not all(x.startswith(c[0] + ".") or x == c[0] for x in c[1:])]
    assert not real, real


def test_layers_stack_one_way():
    graph = _top_level_imports()
    for m, deps in graph.items():
        if m in CORE:
            assert deps <= CORE, (m, deps - CORE)
        if m.startswith("kit.kernels"):
            bad = {d for d in deps if not (d in CORE or d.startswith("kit.kernels"))}
            assert not bad, (m, bad)
        if m.startswith("kit.layers"):
            bad = {d for d in deps if not (d in CORE or d.startswith(("kit.kernels", "kit.layers")))}
            assert not bad, (m, bad)
        if m.startswith("kit.models"):
            bad = {d for d in deps if not (d in CORE or d.startswith(("kit.kernels", "kit.layers", "kit.models")))}
            assert not bad, (m, bad)
        if m not in EXPLORERS and m != "kit.__main__":
            assert not (deps & EXPLORERS), (m, deps & EXPLORERS)
