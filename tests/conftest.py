"""Test-session set-up shared by every module.

Triton kernels (hvdet.ops.*_triton) are checked on CPU machines under Triton's interpreter, which
is chosen when a kernel is *defined*: so TRITON_INTERPRET=1 is set here, before any test imports
hvdet.ops, unless CUDA is present (then the kernels compile for the GPU and ``pytest -m gpu`` runs
the CUDA tests). The ``auto`` implementations never pick Triton for CPU tensors, so only tests that
ask for impl="triton" pay the interpreter's cost.

Markers for the fast loop (``make test-fast`` = ``-m "not multirank and not slow and not gpu"``):

* ``multirank`` is applied here, at collection, to every test that reaches one of the harness's
  launch helpers (``run_ranks``, ``run_command``, ``launch_command``): from its own code, from the
  test modules' functions it calls (also those imported inside the test), or from its fixtures,
  transitively. A launch the scan misses still cannot slip into the fast loop unnoticed:
  ``run_command`` refuses to launch in a test without the marker (``harness.LAUNCH_ALLOWED``, set per
  test below) and says which marker is missing.
* ``slow`` marks single-process tests of 2 s or more on 2 cores (`pytest --durations` finds them), where
  they are defined. Every multi-process test is ``multirank`` already, whatever its time.
"""
import dis
import importlib
import inspect
import os
import types

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests import harness

LAUNCH_HELPERS = frozenset({"run_ranks", "run_command", "launch_command"})


def _names(code: types.CodeType):
    """Global and attribute names a code object uses, its nested functions' and comprehensions' included."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names(const)


def _local_imports(code: types.CodeType) -> dict:
    """{name: object} for the ``from tests.x import name`` statements inside a function's body."""
    found, module = {}, None
    for ins in dis.get_instructions(code):
        if ins.opname == "IMPORT_NAME":
            module = ins.argval
        elif ins.opname == "IMPORT_FROM" and module and module.startswith("tests."):
            found[ins.argval] = getattr(importlib.import_module(module), ins.argval, None)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found.update(_local_imports(const))
    return found


def _reaches_launcher(func, seen: set) -> bool:
    func = inspect.unwrap(func)
    code = getattr(func, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    scope = {**getattr(func, "__globals__", {}), **_local_imports(code)}
    for name in _names(code):
        if name in LAUNCH_HELPERS:
            return True
        callee = scope.get(name)
        # Helpers of the test modules (train_py, ...), never library code: hvdet does not launch ranks.
        if inspect.isfunction(callee) and callee.__module__.startswith("tests.") and _reaches_launcher(callee, seen):
            return True
    return False


def _launches(item: pytest.Item) -> bool:
    seen: set = set()
    if _reaches_launcher(getattr(item, "function", None), seen):
        return True
    fixture_info = getattr(item, "_fixtureinfo", None)  # the fixtures this test requests, transitively
    for defs in (fixture_info.name2fixturedefs.values() if fixture_info else ()):
        if any(_reaches_launcher(d.func, seen) for d in defs):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _launches(item):
            item.add_marker(pytest.mark.multirank)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Before this test's fixtures run, since a fixture may be the one that launches (tests/test_train.py).
    harness.LAUNCH_ALLOWED = item.get_closest_marker("multirank") is not None
