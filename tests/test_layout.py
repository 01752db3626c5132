"""The package's shape: no import loops, and the layers import downward only."""

import ast
from pathlib import Path

GRAFT = Path(__file__).resolve().parent.parent / "graft"


def module_name(path: Path) -> str:
    parts = path.relative_to(GRAFT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The graft modules a file imports, at any depth of the file (lazy imports count: a loop
    through a function-level import is still a loop)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("graft"):
                for alias in node.names:  # "from . import core" names a module
                    sub = f"{target}.{alias.name}"
                    found.add(sub if (GRAFT.parent / (sub.replace(".", "/") + ".py")).exists() else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("graft"))
    return {m for m in found if m != name}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in GRAFT.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != "graft"} for name, path in modules.items()}


def test_no_module_imports_one_that_imports_it_back():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import loop: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_the_math_and_the_distributed_layer_stay_low():
    edges = graph()
    assert edges["graft.core"] == set(), "core is pure math: it imports nothing of graft"
    assert edges["graft.errors"] == set()
    assert edges["graft.dist"] <= {"graft.errors"}, "dist knows torch.distributed and errors only"
    for low in ("graft.engine", "graft.distill", "graft.resume"):
        assert "graft.exchange" not in edges[low], f"{low} needs communication (dist), not the graft step"
