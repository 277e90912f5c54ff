"""The package's import graph: no cycle, no module importing the package root, no public name hiding a module."""

import ast
import importlib
import os
import pkgutil

import dinm

PACKAGE = os.path.dirname(os.path.abspath(dinm.__file__))
MODULES = sorted(m.name for m in pkgutil.iter_modules([PACKAGE]) if not m.name.startswith("_C"))


def _imports(module: str) -> set[str]:
    """The dinm submodules `module` imports, at any depth of its code (function-level imports count too)."""
    path = os.path.join(PACKAGE, "__init__.py" if module == "__init__" else f"{module}.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            else:  # from . import x: x must be a submodule, never a name of the package root
                for alias in node.names:
                    assert alias.name in MODULES or alias.name == "_C", f"{module} imports {alias.name!r} from the root"
                    found.add(alias.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and node.__dict__.get("level", 0) == 0:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(n == "dinm" or n.startswith("dinm.") for n in names), f"{module} imports dinm absolutely"
    return found - {"_C"}


def test_no_import_cycle():
    graph = {m: _imports(m) for m in MODULES}
    state: dict[str, str] = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            visit(n, path + [m])
        state[m] = "done"

    for m in MODULES:
        visit(m, [])


def test_the_package_root_imports_only_the_version_eagerly():
    assert _imports("__init__") >= {"version"}
    with open(os.path.join(PACKAGE, "__init__.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    eager = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.level == 1]
    assert [n.module for n in eager] == ["version"]


def test_no_public_name_shadows_a_submodule():
    for name in dinm.__all__:
        value = getattr(dinm, name)
        assert name not in MODULES, f"dinm.{name} has the name of a submodule"
        assert value is not None
    for module in MODULES:
        assert importlib.import_module(f"dinm.{module}").__name__ == f"dinm.{module}"
        assert getattr(dinm, module).__name__ == f"dinm.{module}"  # the attribute is the module, not a function


def test_every_data_file_of_the_package_is_installed_with_it():
    """A JSON file the package reads (corpora, wrappers) must be in setup.py's package_data, or a non-editable
    install ships the code without it."""
    import re

    with open(os.path.join(os.path.dirname(PACKAGE), "setup.py"), encoding="utf-8") as f:
        (listed,) = re.findall(r'package_data=\{"dinm": \[([^\]]*)\]', f.read())
    shipped = sorted(name for name in os.listdir(PACKAGE) if name.endswith(".json"))
    assert shipped and shipped == sorted(re.findall(r'"([^"]+)"', listed))
