"""Hooks around the Triton launches of a hvdet.ops.*_triton module, for tests (count, record, serialize).

The launch sites are found statically (``kernel[grid](...)`` calls of the module's own @triton.jit
functions), so only launched kernels are wrapped: the kernels they call stay plain JIT functions, which
the interpreter and the compiler need.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def kernel_launches(path: Path):
    """{kernel: its parameter names} of the Triton kernels in ``path``, and every ``kernel[grid](...)`` call."""
    tree = ast.parse(path.read_text())
    kernels = {f.name: {a.arg for a in f.args.args} for f in tree.body if isinstance(f, ast.FunctionDef)
               and any(ast.unparse(d).startswith("triton.jit") for d in f.decorator_list)}
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
             and isinstance(node.func.value, ast.Name) and node.func.value.id in kernels]
    return kernels, calls


class HookedKernel:
    """A Triton kernel whose launches go through ``around(name, kernel, grid, args, kwargs)``, which runs them."""

    def __init__(self, kernel, name: str, around):
        self.kernel, self.name, self.around = kernel, name, around

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.around(self.name, self.kernel, grid, args, kwargs)


def hook_launches(monkeypatch, module, around) -> None:
    """Every launch site of ``module`` goes through ``around`` (see :class:`HookedKernel`)."""
    path = ROOT / (module.__name__.replace(".", "/") + ".py")
    for name in {call.func.value.id for call in kernel_launches(path)[1]}:
        monkeypatch.setattr(module, name, HookedKernel(getattr(module, name), name, around))
