"""The package's layering: every import (at any depth, imports inside functions included) points
down the order of ``LAYERS``, the one docs/ARCHITECTURE.md draws; no two modules import each other;
no module is over 400 lines; and the docs the code cites exist."""

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "stepdistill"
# stepdistill's top-level modules and packages, lowest first: a module may import its own layer and
# the layers before it, never one after it (the package's __init__ re-exports and is not a layer)
LAYERS = ["errors", "storage", "config", "diffusion", "models", "data", "distillers", "training", "export",
          "distill", "msd", "evaluation", "testing", "cli", "__main__"]
MAX_LINES = 400


def _module_name(path: Path, pkg: Path = PKG) -> str:
    parts = path.relative_to(pkg.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str], pkg: Path = PKG) -> set[str]:
    """The stepdistill modules ``path`` imports, resolved to the most specific module, without edges to
    the packages that contain it (importing a submodule runs its package's __init__ first)."""
    name = _module_name(path, pkg)
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


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import of a module from a later layer, and for modules in no layer."""
    out = []
    for module, targets in sorted(graph.items()):
        here = _layer(module)
        if here is None:
            continue
        if here not in LAYERS:
            out.append(f"{module}: not in any layer")
            continue
        for target in sorted(targets):
            there = _layer(target)
            if there is not None and (there not in LAYERS or LAYERS.index(there) > LAYERS.index(here)):
                out.append(f"{module} -> {target}")
    return out


def _graph(pkg: Path = PKG) -> dict[str, set[str]]:
    files = {_module_name(p, pkg): p for p in pkg.rglob("*.py")}
    return {name: _imports(path, set(files), pkg) for name, path in files.items()}


def test_the_layer_check_finds_a_planted_upward_import(tmp_path):
    graph = _graph()
    assert upward_imports(graph) == []
    process = "stepdistill.diffusion.process"
    planted = {**graph, process: graph[process] | {"stepdistill.training.trainer"}}
    assert upward_imports(planted) == ["stepdistill.diffusion.process -> stepdistill.training.trainer"]
    assert upward_imports({**graph, "stepdistill.extras": set()}) == ["stepdistill.extras: not in any layer"]
    # and through the parser: a function-level import of a higher layer in a copy of the package
    import shutil

    copy = tmp_path / "stepdistill"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    models = copy / "models" / "nets.py"
    models.write_text(models.read_text() + "\n\ndef _late():\n    from ..data.batch import Batch\n    return Batch\n")
    assert upward_imports(_graph(copy)) == ["stepdistill.models.nets -> stepdistill.data.batch"]


def test_imports_point_down_the_layers():
    graph = _graph()
    assert any(graph.values())  # the parser sees the package's imports at all
    assert upward_imports(graph) == []


def test_no_module_is_over_the_line_limit():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package():
    assert _cycles(_graph()) == []


def test_docs_cited_by_the_code_exist():
    cited = set()
    for path in list(PKG.rglob("*.py")) + [PKG.parent / "README.md"]:
        cited |= set(re.findall(r"docs/[A-Za-z_]+\.(?:md|png)", path.read_text()))
    assert cited, "the code cites its design docs"
    missing = sorted(c for c in cited if not (PKG.parent / c).is_file())
    assert missing == []
    assert not [p.name for p in PKG.rglob("*.py") if "DESIGN.md" in p.read_text()]  # no document the repo lacks
