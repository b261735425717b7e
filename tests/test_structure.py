"""The package's structure, read from its source with ``ast``: no import cycles between
fastnorm's modules, and no module reaching into another module's private names.

Every import counts, including the lazy ones inside functions (an optional backend imported
on first use is still a dependency). A private name is one starting with ``_`` (dunders
such as ``__version__`` excepted); modules are units of their own, so importing a private
*module* (``from . import _geometry``) is fine, reading ``_geometry._candidates`` is not.
"""
import ast
import os

import pytest

import fastnorm

PKG = os.path.dirname(os.path.abspath(fastnorm.__file__))


def _modules():
    """{dotted name: path} of every module of the fastnorm package."""
    mods = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG))
                name = rel[:-3].replace(os.sep, ".")
                mods[name[:-len(".__init__")] if name.endswith(".__init__") else name] = \
                    os.path.join(root, f)
    return mods


MODULES = _modules()


def _private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve(mod, node):
    """The absolute module an ``ImportFrom`` node names, from inside module ``mod``."""
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[mod].endswith("__init__.py")
    parts = mod.split(".")
    base = parts if is_pkg else parts[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _scan(mod):
    """(imported fastnorm modules, private names used from them) of module ``mod``."""
    tree = ast.parse(open(MODULES[mod], encoding="utf-8").read(), MODULES[mod])
    deps, bad, aliases = set(), [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES:
                    deps.add(a.name)
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(mod, node)
            if src not in MODULES:
                continue
            for a in node.names:
                sub = f"{src}.{a.name}"
                if sub in MODULES:                 # from . import module
                    deps.add(sub)
                    aliases[a.asname or a.name] = sub
                else:                              # from .module import name
                    deps.add(src)
                    if _private(a.name):
                        bad.append(f"from {src} import {a.name} (line {node.lineno})")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and _private(node.attr)
                and aliases[node.value.id] != mod):
            bad.append(f"{aliases[node.value.id]}.{node.attr} (line {node.lineno})")
    deps.discard(mod)
    return deps, bad


GRAPH = {m: _scan(m) for m in MODULES}


def _cycles():
    """Every elementary cycle's first appearance in a depth-first walk (enough to fail on)."""
    found, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(GRAPH[m][0]):
            if d == "fastnorm" or d not in GRAPH:   # the package __init__ re-exports
                continue
            if state.get(d) == "open":
                found.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    return found


def test_the_scan_sees_the_package():
    # the scan must find the modules and the imports it checks, or the tests below are empty
    assert {"fastnorm.api", "fastnorm._dispatch", "fastnorm.autograd", "fastnorm.nn",
            "fastnorm._numba.rows"} <= set(MODULES)
    assert "fastnorm._dispatch" in GRAPH["fastnorm._norms"][0]
    assert "fastnorm._numba._jit" in GRAPH["fastnorm._numba.rows"][0]


def test_no_import_cycles():
    assert _cycles() == []


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_private_names_of_other_modules(mod):
    assert GRAPH[mod][1] == [], f"{mod} uses private names of other modules"


def test_the_checks_detect_what_they_forbid(tmp_path):
    # a cycle and a private use, in throwaway source, are found by the same functions
    saved = dict(MODULES), dict(GRAPH)
    try:
        a, b = tmp_path / "a.py", tmp_path / "b.py"
        a.write_text("from . import b\nx = b._hidden\n")
        b.write_text("def f():\n    from .a import _y\n")
        MODULES.update({"fastnorm.zz_a": str(a), "fastnorm.zz_b": str(b)})
        a.write_text("from . import zz_b\nx = zz_b._hidden\n")
        b.write_text("def f():\n    from .zz_a import _y\n")
        GRAPH.update({m: _scan(m) for m in ("fastnorm.zz_a", "fastnorm.zz_b")})
        assert any("fastnorm.zz_a" in c and "fastnorm.zz_b" in c for c in _cycles())
        assert GRAPH["fastnorm.zz_a"][1] == ["fastnorm.zz_b._hidden (line 2)"]
        assert GRAPH["fastnorm.zz_b"][1] == ["from fastnorm.zz_a import _y (line 2)"]
    finally:
        MODULES.clear()
        MODULES.update(saved[0])
        GRAPH.clear()
        GRAPH.update(saved[1])
