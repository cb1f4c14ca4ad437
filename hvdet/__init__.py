"""hvdet: train object detectors with very large mini-batches on Horovod.

Import submodules directly (``hvdet.comm``, ``hvdet.nn``, ``hvdet.optim``, ...); only
``hvdet.comm`` needs Horovod.
"""

__version__ = "0.1.0"
