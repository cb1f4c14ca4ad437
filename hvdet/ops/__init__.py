"""The kernel layer: every hot operation as a torch reference (the oracle) and faster implementations.

=============================  ===============================  =====================================
operation                      reference (any device, dtype)    faster implementations
=============================  ===============================  =====================================
(PMD-)LAMB multi-tensor step   ``lamb.reference_step``          ``cpp`` (fp32 CPU), ``triton`` (CUDA)
CGBN local moments (n, mu, M2) ``bn.moments``, impl reference   ``triton``
CGBN backward reductions       ``bn.backward_reduce``           ``aten`` (CPU), ``triton``
CGBN input gradient            ``bn.input_grad``                ``triton`` (``input_grad_from_sums``)
=============================  ===============================  =====================================

"impl" is the one word for *which implementation of an operation* runs; "backend" is kept for the
collective a Cross-GPU BN group uses (hvdet.comm). Every op takes ``impl="auto"`` (the fastest one
that accepts the tensors: see each module's ``IMPLS`` and ``choose``) or names one; naming one that
cannot take the tensors raises. The Triton kernels run on CUDA tensors, and on CPU tensors when
``TRITON_INTERPRET=1`` is set before hvdet is imported (how the tests check them on CPU machines).
A new kernel (CUDA C++, Apex) slots in as one more impl, and the oracle tests in
tests/test_ops.py apply to it by adding its name to their parameter lists.

nn/ and optim/ keep only the autograd and optimizer glue around these.
"""
from hvdet.ops.triton_support import triton_available

__all__ = ["triton_available"]
