"""One home per job (DESIGN.md): no two of the project's modules import each other, directly or around a longer loop,
counting the imports inside functions too (a lazy import hides a cycle from Python, not from a reader)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def project_imports(path, modules):
    """The project modules that the file at `path` imports anywhere in it (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & modules - {path.stem}


def import_graph(root=REPO):
    """{module: the project modules it imports} over the top-level .py files of `root`."""
    files = {p.stem: p for p in root.glob("*.py")}
    return {name: project_imports(p, set(files)) for name, p in files.items()}


def find_cycle(graph):
    """A list of modules [a, b, ..., a] that import each other in a loop, or None (depth-first search)."""
    state, stack = {}, []                      # state: 1 on the current path, 2 finished

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert {"train", "sample", "checkpoint", "model", "data", "config"} <= set(graph)
    assert "checkpoint" in graph["train"] and "checkpoint" in graph["sample"]   # the loaders' one home
    cycle = find_cycle(graph)
    assert cycle is None, "modules import each other: " + " -> ".join(cycle)


def test_find_cycle_sees_lazy_imports(tmp_path):
    """The checker itself: a mutual import hidden inside a function, and a loop of three, are found."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    (tmp_path / "c.py").write_text("import numpy\n")
    assert find_cycle(import_graph(tmp_path)) == ["a", "b", "a"]
    (tmp_path / "b.py").write_text("import c\n")
    assert find_cycle(import_graph(tmp_path)) is None
    (tmp_path / "c.py").write_text("def g():\n    import a\n")
    assert find_cycle(import_graph(tmp_path)) == ["a", "b", "c", "a"]
