"""Imports run one way through the package, as the table in steplaw/__init__.py says.

The table is an order: each layer's row names only layers above it, and a module's
layer is its subpackage with no exceptions (a command module lives in steplaw/cli/, on
top), so no package imports a higher layer at all.

Every module's source is parsed (nothing is imported), so imports inside functions count
as much as those at the top: a cycle hidden in a function is still a cycle. Three checks:
each import goes from a layer to one it may import; modules do not import each other in
a cycle; no import of one of steplaw's own modules sits in a `try` that catches its
failure (a fallback hides broken code).
"""
from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "steplaw"
# The compiled extension: optional by design (ops fall back to the references), and not
# a Python module of the package.
EXTENSION = "_C"
_CATCHES_IMPORT_FAILURE = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


@dataclass
class Rules:
    may_import: dict[str, set[str]]  # layer -> the layers it may import ("*": all), in the table's order
    neutral: set[str]  # steplaw.<name> modules anyone may import
    cli: set[str]  # top-level steplaw.<name> modules of the cli layer (e.g. __main__)


def parse_rules(package: Path) -> Rules:
    """The layer table of the package docstring (see steplaw/__init__.py)."""
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    lines = doc.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["layer", "may", "import"])
    may_import: dict[str, set[str]] = {}
    for line in lines[header + 1:]:
        if not line.strip():
            break
        layer, *rest = line.split()
        words = " ".join(rest).split("(")[0].split()
        may_import[layer] = {"*"} if words == ["everything"] else set() if words == ["nothing"] else set(words)
    named = {}
    for line in lines:
        key, sep, value = line.strip().partition(":")
        if sep and key in ("neutral", "cli") and value.strip():
            named[key] = set(value.split())
    return Rules(may_import, named["neutral"], named["cli"])


def _module_name(package: Path, path: Path) -> str:
    parts = [package.name, *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: list[tuple[str, int]] = field(default_factory=list)  # (module, line)
    fallbacks: list[tuple[str, int]] = field(default_factory=list)


def _catches_import_failure(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(ast.unparse(n).split(".")[-1] in _CATCHES_IMPORT_FAILURE for n in names)


def _carries_on(handler: ast.ExceptHandler) -> bool:
    """Whether the handler goes on after the failure: it does not end by raising, or it
    leaves a way out (continue, break, return)."""
    raises = isinstance(handler.body[-1], ast.Raise)
    escapes = any(isinstance(n, (ast.Continue, ast.Break, ast.Return)) for s in handler.body for n in ast.walk(s))
    return escapes or not raises


def _imported(node: ast.AST, module: Module, known: set[str]) -> list[str]:
    """The modules of the package an import statement or import_module("...") call names.
    `from a import b` names a.b when that is a module, else a."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base_parts = module.name.split(".")[: len(module.name.split(".")) - node.level + module.is_package]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    if isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__"):
        if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            return [node.args[0].value]
        return ["<dynamic>"]
    return []


def scan(package: Path) -> dict[str, Module]:
    """Every module of the package with the package modules it imports, anywhere in it."""
    paths = sorted(package.rglob("*.py"))
    modules = {_module_name(package, p): Module(_module_name(package, p), p, p.name == "__init__.py") for p in paths}
    root, known = package.name, set(modules)
    for module in modules.values():
        tree = ast.parse(module.path.read_text(), filename=str(module.path))
        # A named module of ours inside a try that catches its failure is a fallback even
        # when the handler raises (a broken module would read as a user's mistake); a
        # dynamic import (a module the user named) only when the handler carries on.
        guarded: set[int] = set()
        swallowed: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try):
                inner = {id(n) for stmt in node.body for n in ast.walk(stmt)}
                catching = [h for h in node.handlers if _catches_import_failure(h)]
                guarded.update(inner if catching else ())
                swallowed.update(inner if any(_carries_on(h) for h in catching) else ())
        for node in ast.walk(tree):
            for name in _imported(node, module, known):
                ours = name == root or name.startswith(root + ".")
                if ours:
                    module.imports.append((name, node.lineno))
                if name == "<dynamic>" and id(node) in swallowed or (
                        ours and id(node) in guarded and name != f"{root}.{EXTENSION}"):
                    module.fallbacks.append((name, node.lineno))
    return modules


def layer_of(name: str, rules: Rules) -> str | None:
    """'root', 'neutral', a layer of the table, or None for a module the table does not place.
    The compiled extension belongs to ops, its Python face."""
    parts = name.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] == EXTENSION:
        return "ops"
    if parts[1] in rules.neutral and len(parts) == 2:
        return "neutral"
    if len(parts) == 2 and parts[1] in rules.cli:
        return "cli"
    return parts[1] if parts[1] in rules.may_import else None


def layer_violations(modules: dict[str, Module], rules: Rules) -> list[str]:
    found = []
    for module in modules.values():
        src = layer_of(module.name, rules)
        if src is None:
            found.append(f"{module.name}: not placed in the layer table")
            continue
        for name, line in module.imports:
            dst = layer_of(name, rules)
            if dst == "root" or dst == src or (dst == "neutral" and src != "neutral"):
                continue
            if dst is None:
                found.append(f"{module.name}:{line} imports {name}, which the layer table does not place")
            elif src == "neutral" or ("*" not in rules.may_import[src] and dst not in rules.may_import[src]):
                found.append(f"{module.name}:{line} ({src}) imports {name} ({dst})")
    return found


def import_cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    graph = {m.name: {n for n, _ in m.imports if n in modules and n != m.name} for m in modules.values()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def _cycle_text(group: list[str], modules: dict[str, Module]) -> str:
    members = set(group)
    edges = [f"{m} -> {n} (line {line})" for m in group for n, line in modules[m].imports if n in members and n != m]
    return "; ".join(edges)


# --- the package itself ---------------------------------------------------------------


@pytest.fixture(scope="module")
def rules() -> Rules:
    return parse_rules(PACKAGE)


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return scan(PACKAGE)


def test_layer_table_places_every_subpackage(rules):
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert rules.neutral and rules.cli and "cli" in rules.may_import
    assert subpackages - set(rules.may_import) == set(), "add the new package to the table in steplaw/__init__.py"
    for layer, allowed in rules.may_import.items():
        assert allowed <= set(rules.may_import) | {"*"}, f"{layer} may import an unknown layer: {allowed}"


def upward_rows(rules: Rules) -> list[str]:
    """Rows of the table that name a layer not above them: the table must be an order."""
    order = list(rules.may_import)
    found = []
    for position, (layer, allowed) in enumerate(rules.may_import.items()):
        above = set(order[:position])
        if "*" in allowed:
            if position != len(order) - 1:
                found.append(f"{layer} may import everything but is not the last row")
        elif allowed - above:
            found.append(f"{layer} may import {sorted(allowed - above)}, not above it in the table")
    return found


def test_layer_table_is_an_order(rules):
    found = upward_rows(rules)
    assert not found, "the layer table of steplaw/__init__.py:\n" + "\n".join(found)
    assert list(rules.may_import)[-1] == "cli", "the commands sit on top"


def test_no_command_module_outside_the_cli_package():
    strays = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("cli.py"))
    assert not strays, f"command modules belong in steplaw/cli/: {strays}"


def test_imports_run_down_the_layers(modules, rules):
    found = layer_violations(modules, rules)
    assert not found, "imports against the layer table in steplaw/__init__.py:\n" + "\n".join(found)


def test_no_import_cycles(modules):
    cycles = import_cycles(modules)
    assert not cycles, "modules importing each other in a cycle:\n" + "\n".join(_cycle_text(c, modules) for c in cycles)


def test_no_fallback_for_steplaw_modules(modules):
    found = [f"{m.name}:{line} guards the import of {name} with an except that catches its failure"
             for m in modules.values() for name, line in m.fallbacks]
    assert not found, "\n".join(found)


# --- the checker, on a made-up package: each check can fail ------------------------


_TABLE = '''"""Toy.

    layer     may import (besides its own modules and the neutral ones)
    low       nothing
    high      low
    cli       everything

    neutral:  errors
    cli:      entry
"""
'''


def _toy(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / "toy"
    for rel, text in {"__init__.py": _TABLE, "errors.py": "", "low/__init__.py": "", "high/__init__.py": "",
                      **files}.items():
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text(textwrap.dedent(text))
    return package


def test_checker_finds_an_upward_import_inside_a_function(tmp_path):
    package = _toy(tmp_path, {
        "low/a.py": "from toy.errors import E\ndef f():\n    from toy.high import b\n",
        "high/b.py": "from toy.low import a\n",
        "high/c.py": "import toy.cli.main\n",
        "cli/__init__.py": "",
        "cli/main.py": "from toy.high import b\n",
        "entry.py": "import toy.cli.main\n",
    })
    found = layer_violations(scan(package), parse_rules(package))
    assert found == ["toy.high.c:1 (high) imports toy.cli.main (cli)", "toy.low.a:3 (low) imports toy.high.b (high)"]


def test_checker_finds_a_row_naming_a_lower_layer(tmp_path):
    package = _toy(tmp_path, {"__init__.py": _TABLE.replace("low       nothing", "low       high")})
    assert upward_rows(parse_rules(package)) == ["low may import ['high'], not above it in the table"]
    assert upward_rows(parse_rules(_toy(tmp_path / "ok", {}))) == []


def test_checker_finds_relative_imports_a_cycle_and_a_fallback(tmp_path):
    package = _toy(tmp_path, {
        "low/a.py": "from . import b\n",
        "low/b.py": "def f():\n    from .a import g\n",
        "errors.py": "try:\n    from toy.low import a\nexcept ImportError:\n    a = None\n",
        "entry.py": "import importlib\ntry:\n    importlib.import_module('toy._C')\nexcept Exception:\n    pass\n",
        "high/load.py": "import importlib\ndef load(name):\n    try:\n        return importlib.import_module(name)\n"
                        "    except ImportError as exc:\n        raise SystemExit(str(exc))\n",
        "high/e.py": "try:\n    from toy.low import a\nexcept ImportError as exc:\n    raise SystemExit(str(exc))\n",
        "high/d.py": "for name in ['toy.low.a']:\n    try:\n        __import__(name)\n    except ModuleNotFoundError:\n"
                     "        continue\n    raise\n",
    })
    modules = scan(package)
    assert import_cycles(modules) == [["toy.low.a", "toy.low.b"]]
    assert modules["toy.errors"].fallbacks == [("toy.low.a", 2)]
    assert modules["toy.entry"].fallbacks == []  # the optional compiled extension
    assert modules["toy.high.load"].fallbacks == []  # the failure becomes an error
    assert modules["toy.high.d"].fallbacks == [("<dynamic>", 3)]
    assert modules["toy.high.e"].fallbacks == [("toy.low.a", 2)]  # ours: broken code, not a user error
    assert layer_violations(modules, parse_rules(package)) == ["toy.errors:2 (neutral) imports toy.low.a (low)"]


def test_checker_refuses_a_module_the_table_does_not_place(tmp_path):
    package = _toy(tmp_path, {"extra/__init__.py": "", "low/a.py": "import toy.extra\n"})
    found = layer_violations(scan(package), parse_rules(package))
    assert "toy.extra: not placed in the layer table" in found
    assert "toy.low.a:1 imports toy.extra, which the layer table does not place" in found
