"""One rank of a test job: ``python -m tests._rank_worker module:function OUT_DIR``.

Started by a real launcher (horovodrun / mpirun / torchrun) from :func:`tests.harness.run_ranks`.
Initializes hvdet.comm (``gradients="ddp"`` under torchrun), calls the function with the keyword
arguments pickled in OUT_DIR/kwargs.pkl, and writes its return value (or the traceback) to
OUT_DIR/rank<R>.pkl.
"""
import importlib
import os
import pickle
import sys
import traceback

import torch


def main() -> int:
    target, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from hvdet import comm
    from hvdet.comm import torch_world

    comm.init(gradients="ddp" if torch_world.launched() else "horovod")
    module_name, func_name = target.split(":")
    with open(os.path.join(out_dir, "kwargs.pkl"), "rb") as f:
        kwargs = pickle.load(f)
    try:
        result, ok = getattr(importlib.import_module(module_name), func_name)(**kwargs), True
    except BaseException:  # noqa: BLE001 - reported to the test with the rank, failing it there
        result, ok = traceback.format_exc(), False
    with open(os.path.join(out_dir, f"rank{comm.rank()}.pkl"), "wb") as f:
        pickle.dump((ok, result), f)
    # Exit without hvd.shutdown(): a failed rank must not wait in a collective for the others. A
    # torch.distributed world is torn down here (a local step, no collective): left to the interpreter's
    # exit, its Gloo threads were once destroyed unjoined ("terminate called without an active
    # exception", SIGABRT after the rank had written its result).
    if ok and comm.gradients() == "ddp":
        comm.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
