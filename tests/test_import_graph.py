"""The core's modules import each other along a straight line: no import cycle.

Every import counts, at module level or inside a function (a lazy import still
ties two modules: one cannot be understood, moved or tested without the other).
"""

from __future__ import annotations

import ast
from pathlib import Path

import umbrella_core

ROOT = Path(umbrella_core.__file__).parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the core modules it imports (``from X import name`` counts X and X.name)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_core_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    # The run and its staged recipes used to import each other.
    assert "umbrella_core.train.run" not in import_graph()["umbrella_core.train.run"]
    assert "umbrella_core.train.recipes" not in import_graph()["umbrella_core.train.run"]


# -- layers ----------------------------------------------------------------------------

#: The applications: what a user runs on top of the kernel (hook specifications, plugin
#: host, configuration, data, model, inference, training, evaluation). The kernel never
#: imports them, nor the plugin author's kit (``testing``), which builds on the kernel.
APPLICATIONS = ("commands", "export", "launch", "serve")
ABOVE_THE_KERNEL = (*APPLICATIONS, "testing")


def _package(module: str) -> str:
    """``umbrella_core.train.run`` -> ``train``; the package face itself is ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        here = _package(module)
        packages.setdefault(here, set()).update(_package(t) for t in targets if _package(t) != here)
    return packages


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import from a kernel module into an application or the testing kit."""
    return sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if _package(module) not in ABOVE_THE_KERNEL
        for target in targets
        if _package(target) in ABOVE_THE_KERNEL
    )


def test_the_kernel_never_imports_an_application():
    assert upward_imports(import_graph()) == []


def test_no_package_imports_back_into_another():
    assert cycles(package_graph(import_graph())) == []


def test_no_module_imports_the_package_face():
    """``umbrella_core/__init__`` re-exports from the packages: importing it back from one
    of them would tie that package to every other (``from umbrella_core import hookimpl``
    in a built-in plugin once made data, plugins and the face one knot)."""
    graph = import_graph()
    face = sorted(m for m, targets in graph.items() if "umbrella_core" in targets)
    assert face == []


def test_the_layer_checks_find_what_they_look_for():
    graph = {
        "umbrella_core.train.run": {"umbrella_core.serve.api"},
        "umbrella_core.serve.api": {"umbrella_core.train.run"},
        "umbrella_core.commands": {"umbrella_core.train.run"},
    }
    assert upward_imports(graph) == ["umbrella_core.train.run -> umbrella_core.serve.api"]
    assert cycles(package_graph(graph)) == [["serve", "train"]]


# -- one door per name -------------------------------------------------------------------

REPOSITORY = ROOT.parent


def _top_level(tree: ast.Module) -> tuple[set[str], dict[str, str]]:
    """What a module defines itself, and the names it imports (name -> source module)."""
    defined: set[str] = set()
    imported: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.update({a.asname or a.name: node.module for a in node.names})
    return defined, imported


def second_doors(sources: dict[str, str], modules: dict[str, bool]) -> list[str]:
    """Each ``from M import name`` where M is a plain module (not a package face) that only
    imports ``name`` from elsewhere: the name then has two import paths, and moving it
    breaks whoever took the second. ``sources`` maps file -> text, ``modules`` maps a
    module name -> whether it is a package ``__init__``."""
    trees = {path: ast.parse(text, path) for path, text in sources.items()}
    tops = {}
    for path, tree in trees.items():
        module = _module_name(path)
        if module in modules:
            tops[module] = _top_level(tree)
    found = []
    for path, tree in sorted(trees.items()):
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
                continue
            if node.module not in tops or modules[node.module]:
                continue
            defined, imported = tops[node.module]
            for alias in node.names:
                name = alias.name
                if name in imported and name not in defined and f"{node.module}.{name}" not in tops:
                    found.append(
                        f"{path}: {name} from {node.module} (it lives in {imported[name]})"
                    )
    return found


def _module_name(path: str) -> str:
    parts = list(Path(path).with_suffix("").parts)
    if parts[:1] == ["plugins"]:
        parts = parts[2:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _repository_sources() -> tuple[dict[str, str], dict[str, bool]]:
    sources, modules = {}, {}
    for folder in ("umbrella_core", "plugins", "tests", "benchmarks", "examples"):
        for path in sorted((REPOSITORY / folder).rglob("*.py")):
            relative = str(path.relative_to(REPOSITORY))
            sources[relative] = path.read_text()
    for relative in sources:
        name = _module_name(relative)
        if name.split(".")[0].startswith("umbrella_"):
            modules[name] = relative.endswith("__init__.py")
    return sources, modules


def test_every_name_has_one_import_path():
    sources, modules = _repository_sources()
    assert second_doors(sources, modules) == []


def test_the_door_check_finds_a_second_path():
    sources = {
        "umbrella_core/constants.py": "IGNORE_INDEX = -100\n",
        "umbrella_core/data/conversation.py": "from umbrella_core.constants import IGNORE_INDEX\n",
        "umbrella_core/data/__init__.py": "from umbrella_core.constants import IGNORE_INDEX\n",
        "tests/test_a.py": (
            "from umbrella_core.data.conversation import IGNORE_INDEX\n"
            "from umbrella_core.data import IGNORE_INDEX as FACE\n"
            "from umbrella_core.constants import IGNORE_INDEX as HOME\n"
        ),
    }
    modules = {
        "umbrella_core.constants": False,
        "umbrella_core.data.conversation": False,
        "umbrella_core.data": True,
    }
    assert second_doors(sources, modules) == [
        "tests/test_a.py: IGNORE_INDEX from umbrella_core.data.conversation "
        "(it lives in umbrella_core.constants)"
    ]


# -- functions a reader takes in at once -----------------------------------------------

LONGEST_FUNCTION = 80


def long_functions(sources: dict[str, str], limit: int = LONGEST_FUNCTION) -> list[str]:
    """``file:function (lines)`` for each function longer than ``limit`` lines, nested ones
    included: a function that long holds several steps, which want names."""
    found = []
    for path, text in sorted(sources.items()):
        for node in ast.walk(ast.parse(text, path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path}:{node.name} ({lines})")
    return found


def test_no_core_function_is_longer_than_a_screen_or_two():
    sources = {str(p.relative_to(REPOSITORY)): p.read_text() for p in ROOT.rglob("*.py")}
    assert long_functions(sources) == []


def test_the_length_check_counts_nested_functions():
    body = "\n".join(f"        x{i} = {i}" for i in range(80))
    text = f"def short():\n    pass\n\n\ndef outer():\n    def inner():\n{body}\n"
    assert long_functions({"m.py": text}) == ["m.py:outer (82)", "m.py:inner (81)"]
