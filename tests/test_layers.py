"""The layering rule of ARCHITECTURE.md, read from the source: no import circles among fastclr's
modules (imports inside functions included), the library never imports the application (but for
the entry points of ``python -m fastclr.<command>`` and the deprecated names of fastclr/__init__.py),
no module takes another's private names, and the application stays off the library's private
modules."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastclr")
ENTRY_POINTS = {"fastclr.train", "fastclr.evaluate", "fastclr.export", "fastclr.embed"}


def module_files(root=ROOT) -> dict:
    """{dotted module name: path} of every .py file of the package under ``root``."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(root))
                dotted = rel[:-3].replace(os.sep, ".")
                out[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = \
                    os.path.join(folder, name)
    return out


def _is_package(module: str, modules: dict) -> bool:
    return modules[module].endswith("__init__.py")


def imports_of(module: str, modules: dict) -> list:
    """(imported fastclr module, name taken from it or None, line) for every import statement of
    ``module``, at any depth (function bodies too); ``from pkg import sub`` counts as importing
    the submodule ``pkg.sub``."""
    with open(modules[module]) as f:
        tree = ast.parse(f.read())
    package = module if _is_package(module, modules) else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "fastclr"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.split(".")[0] != "fastclr":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules or sub == "fastclr._C":
                    out.append((sub, None, node.lineno))
                else:
                    out.append((base, a.name, node.lineno))
    return out


def import_graph(modules: dict) -> dict:
    return {m: {target for target, _, _ in imports_of(m, modules) if target in modules}
            for m in modules}


def find_cycle(graph: dict):
    """One import circle as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def is_application(module: str) -> bool:
    return module == "fastclr.app" or module.startswith("fastclr.app.")


MODULES = module_files()


def test_no_import_circles():
    assert find_cycle(import_graph(MODULES)) is None, find_cycle(import_graph(MODULES))


def test_the_library_never_imports_the_application():
    bad = [(m, target, line) for m in MODULES if not is_application(m) and m not in ENTRY_POINTS
           for target, _, line in imports_of(m, MODULES) if is_application(target)]
    assert bad == []


def test_no_module_takes_another_modules_private_names():
    bad = [(m, f"{target}.{name}", line) for m in MODULES for target, name, line in imports_of(m, MODULES)
           if name and name.startswith("_") and not name.startswith("__") and target != m]
    assert bad == []


def test_the_application_uses_the_public_library():
    bad = [(m, target, line) for m in MODULES if is_application(m)
           for target, _, line in imports_of(m, MODULES)
           if not is_application(target) and any(p.startswith("_") for p in target.split("."))]
    assert bad == []


def test_application_modules_stay_readable():
    """A module per responsibility: none of fastclr/app over 600 lines."""
    lines = {m: sum(1 for _ in open(path)) for m, path in MODULES.items() if is_application(m)}
    assert max(lines.values()) <= 600, sorted(lines.items(), key=lambda kv: -kv[1])[:3]


def test_the_deprecated_names_still_work_and_say_where_they_went():
    import fastclr
    with pytest.warns(DeprecationWarning, match="from fastclr.app.export import load_backbone"):
        from_library = fastclr.load_backbone
    from fastclr.app.export import load_backbone
    assert from_library is load_backbone
    with pytest.warns(DeprecationWarning, match="from fastclr.app.augment import TorchSimCLRAugment"):
        fastclr.TorchSimCLRAugment
    with pytest.raises(AttributeError):
        fastclr.no_such_name


# --- the checks themselves, on a package the test writes ---------------------------------------

def _package(tmp_path, files: dict) -> dict:
    for rel, text in files.items():
        path = tmp_path / "fastclr" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return module_files(str(tmp_path / "fastclr"))


def test_a_circle_hidden_inside_a_function_is_found(tmp_path):
    modules = _package(tmp_path, {
        "__init__.py": "", "app/__init__.py": "",
        "app/data.py": "from .sampling import Order\n",
        "app/sampling.py": "def f():\n    from . import data\n",
    })
    assert find_cycle(import_graph(modules)) == ["fastclr.app.data", "fastclr.app.sampling", "fastclr.app.data"]


def test_the_library_reaching_up_and_private_names_are_found(tmp_path):
    modules = _package(tmp_path, {
        "__init__.py": "def f():\n    from fastclr.app.export import load\n",
        "app/__init__.py": "", "app/export.py": "from ..loss import _check\nimport fastclr._dispatch\n",
        "loss.py": "", "_dispatch.py": "",
    })
    assert [t for t, _, _ in imports_of("fastclr", modules)] == ["fastclr.app.export"]
    assert imports_of("fastclr.app.export", modules) == [("fastclr.loss", "_check", 1),
                                                         ("fastclr._dispatch", None, 2)]
