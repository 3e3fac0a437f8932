"""No import cycle among the quantdream modules.

Walks every module under src/quantdream with the ast module and follows every import of a quantdream module,
at the top of a file or inside a function alike (a deferred import that closes a circle is still a circle:
the two modules cannot be understood, or moved, one without the other). Imports under ``if TYPE_CHECKING:``
are left out: they never run.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "quantdream"


def module_files() -> dict[str, Path]:
    out = {}
    for f in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
           (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The quantdream modules that ``name`` imports (``from pkg import sub`` names the submodule)."""
    is_pkg = path.name == "__init__.py"
    found = set()

    def resolve(target: str) -> str | None:
        while target and target not in modules:          # `import quantdream.x.y.Class` -> the module part
            target = target.rpartition(".")[0]
        return target or None

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(resolve(a.name) for a in child.names if a.name.split(".")[0] == PACKAGE)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                if mod.split(".")[0] != PACKAGE:
                    continue
                for a in child.names:
                    sub = f"{mod}.{a.name}"
                    found.add(sub if sub in modules else resolve(mod))
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {m for m in found if m and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v); on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on_stack.discard(w); comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    import sys
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return comps


def test_the_walk_sees_the_imports():
    g = import_graph()
    assert "quantdream.train" in g and "quantdream.methods.zoodip" in g
    assert "quantdream.optim.zo" in g["quantdream.methods.zoodip"]       # a top-level import is followed


def test_find_cycles_finds_a_circle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles among quantdream modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)
