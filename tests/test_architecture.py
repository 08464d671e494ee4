"""The structure docs/architecture.md promises, checked on the source: packages depend one way
(spec below models/data, below engine, below analysis; the CLI edge above all), no import cycle
between modules, and no function in the engine over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "smallbig"

# lower layers never import higher ones (the CLI edge may import anything)
LAYERS = [
    ("base", ["smallbig", "smallbig.errors", "smallbig.fsutil", "smallbig.gitinfo", "smallbig.yamlsafe"]),
    ("spec", ["smallbig.config", "smallbig.spec"]),
    ("models+data", ["smallbig.models", "smallbig.data"]),
    ("engine", ["smallbig.engine"]),
    ("analysis", ["smallbig.analysis"]),
]
CLI_EDGE = {"smallbig.cli", "smallbig.__main__", "smallbig.config_cli", "smallbig.dvc_cli"}
MAX_ENGINE_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_cli_edge(mod: str) -> bool:
    return mod in CLI_EDGE or mod.endswith(".cli")


def _layer(mod: str) -> int:
    best, depth = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > depth:
                best, depth = i, len(p)
    assert best is not None, mod
    return best


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("smallbig"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("smallbig"):
            for a in node.names:  # `from smallbig.spec import plan` imports smallbig.spec.plan
                sub = f"{node.module}.{a.name}"
                out.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists() else node.module)
    return out


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def test_layers_point_one_way():
    wrong = []
    for mod, path in MODULES.items():
        if _is_cli_edge(mod):
            continue
        for imp in _imports(path, top_level_only=False):
            if _is_cli_edge(imp):
                wrong.append(f"{mod} imports the CLI edge {imp}")
            elif _layer(imp) > _layer(mod):
                wrong.append(f"{mod} ({LAYERS[_layer(mod)][0]}) imports {imp} ({LAYERS[_layer(imp)][0]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_modules():
    graph = {
        m: {i for i in _imports(p, top_level_only=True) if i in MODULES and i != m}
        for m, p in MODULES.items()
    }
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n) :] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("path", sorted((PKG / "engine").glob("*.py")), ids=lambda p: p.name)
def test_engine_functions_are_short(path):
    long = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            if n > MAX_ENGINE_FUNCTION_LINES:
                long.append(f"{path.name}:{node.lineno} {node.name}() is {n} lines")
    assert not long, "\n".join(long)


def test_the_checks_see_a_violation(tmp_path):
    """The checks above can fail: a long function and an upward import are found."""
    src = tmp_path / "m.py"
    src.write_text("from smallbig.analysis import html\n\ndef f():\n" + "    x = 1\n" * 90)
    tree = ast.parse(src.read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
    assert fn.end_lineno - fn.lineno + 1 > MAX_ENGINE_FUNCTION_LINES
    assert _layer("smallbig.analysis.html") > _layer("smallbig.engine.train")
    assert "smallbig.analysis.html" in _imports(src, top_level_only=True)
