"""The package's layers (docs/ARCHITECTURE.md, "Layers"): each module imports only from its own layer or
those below, and nothing imports in a cycle. Imports inside functions count too: they defer heavy
libraries, never dodge a cycle."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"

# lowest first; a module belongs to the first entry whose prefix names it
LAYERS: List[Tuple[str, ...]] = [
    ("pipeline.errors", "pipeline.files", "pipeline.lifetime"),
    ("pipeline.config",),
    ("pipeline.formats", "pipeline.models", "pipeline.safeload", "pipeline.destination", "pipeline.integrity",
     "pipeline.lock", "pipeline.launch"),
    ("pipeline.runner",),
    ("pipeline.data",),
    ("pipeline.train",),
    ("pipeline.convert",),
    ("pipeline.stages", "pipeline.plan", "pipeline.report", "pipeline.cli"),
]


def modules() -> Dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, name: str, known: Set[str]) -> Set[str]:
    """The package modules `name` imports, anywhere in it (`from pipeline import x` counts as pipeline.x)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # pipeline.data.mix.run -> pipeline.data.mix
                target = target.rpartition(".")[0]
            if target and target != name and target != "pipeline":
                out.add(target)
    return out


def layer_of(name: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS (and to docs/ARCHITECTURE.md)")


def graph() -> Dict[str, Set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {t for t in imports(path, name, known) if not name.startswith(t + ".")}  # a package's own __init__
            for name, path in mods.items() if name != "pipeline"}


def test_every_module_imports_only_from_its_layer_or_below():
    violations = [f"{name} (layer {layer_of(name)}) imports {dep} (layer {layer_of(dep)})"
                  for name, deps in sorted(graph().items()) for dep in sorted(deps) if layer_of(dep) > layer_of(name)]
    assert not violations, "\n".join(violations)


def test_no_import_cycle():
    g, state, cycles = graph(), {}, []

    def visit(node: str, stack: List[str]) -> None:
        state[node] = "open"
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [node, dep]) if dep in stack
                              else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_a_violation_and_a_cycle(tmp_path):
    """The AST walk finds imports at any depth, relative ones included."""
    fake = tmp_path / "mod.py"
    fake.write_text("def f():\n    from pipeline.cli import main\n    from .sources import x\n")
    found = imports(fake, "pipeline.data.mix", {"pipeline.cli", "pipeline.data.sources", "pipeline.data.mix"})
    assert found == {"pipeline.cli", "pipeline.data.sources"}
    assert layer_of("pipeline.cli") > layer_of("pipeline.data.mix")


def test_test_modules_have_unique_names():
    """pytest imports test modules by basename (rootdir-relative, no packages): a second test_x.py in
    another tier stops the whole collection."""
    import collections

    names = collections.Counter(p.name for p in (PACKAGE.parent / "tests").rglob("test_*.py"))
    assert [n for n, count in names.items() if count > 1] == []
