"""Test-session set-up shared by every module.

Triton kernels (hvdet.ops.*_triton) are checked on CPU machines under Triton's interpreter, which
is chosen when a kernel is *defined*: so TRITON_INTERPRET=1 is set here, before any test imports
hvdet.ops, unless CUDA is present (then the kernels compile for the GPU and ``pytest -m gpu`` runs
the CUDA tests). The ``auto`` implementations never pick Triton for CPU tensors, so only tests that
ask for impl="triton" pay the interpreter's cost.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
