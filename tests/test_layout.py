"""The package's layering: no two modules of stepdistill import each other (directly or around a
loop), at any depth (imports inside functions count), and the docs the code cites exist."""

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "stepdistill"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The stepdistill modules ``path`` imports, resolved to the most specific module, without edges to
    the packages that contain it (importing a submodule runs its package's __init__ first)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):
                found.add(t)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package():
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {name: _imports(path, set(files)) for name, path in files.items()}
    assert any(graph.values())  # the parser sees the package's imports at all
    assert _cycles(graph) == []


def test_docs_cited_by_the_code_exist():
    cited = set()
    for path in list(PKG.rglob("*.py")) + [PKG.parent / "README.md"]:
        cited |= set(re.findall(r"docs/[A-Za-z_]+\.(?:md|png)", path.read_text()))
    assert cited, "the code cites its design docs"
    missing = sorted(c for c in cited if not (PKG.parent / c).is_file())
    assert missing == []
    assert not [p.name for p in PKG.rglob("*.py") if "DESIGN.md" in p.read_text()]  # no document the repo lacks
