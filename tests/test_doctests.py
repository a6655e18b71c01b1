"""Every docstring example in the package runs as printed (``make test`` only collects tests/)."""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import orbit_pyg

# Modules whose examples are the heart of the documentation: they must have some.
MUST_HAVE_EXAMPLES = {
    "orbit_pyg.schedules", "orbit_pyg.kernels", "orbit_pyg.estimator", "orbit_pyg.losses",
    "orbit_pyg.diagnostics", "orbit_pyg.nn", "orbit_pyg.orbits.base", "orbit_pyg.orbits.rotation",
    "orbit_pyg.orbits.permutation",
}


def _module_names() -> list[str]:
    names = {"orbit_pyg"}
    for info in pkgutil.walk_packages(orbit_pyg.__path__, "orbit_pyg."):
        names.add(info.name)
    try:  # the integrations live in another folder, mapped to orbit_pyg.integrations
        integ = importlib.import_module("orbit_pyg.integrations")
        names.add(integ.__name__)
        for info in pkgutil.walk_packages(integ.__path__, "orbit_pyg.integrations."):
            names.add(info.name)
    except ImportError:
        pass
    return sorted(names)


MODULES = _module_names()


def test_core_modules_are_discovered():
    assert MUST_HAVE_EXAMPLES <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:  # an optional dependency of an integration
        if name.startswith("orbit_pyg.integrations") and err.name and not err.name.startswith("orbit_pyg"):
            pytest.skip(f"{name} needs the optional dependency {err.name}")
        raise
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, name) if t.examples]
    # only the docstrings defined in this module (not re-exported objects)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name}"
    if name in MUST_HAVE_EXAMPLES:
        assert result.attempted > 0, f"{name} has no docstring examples"
