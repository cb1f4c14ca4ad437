"""Compile recorded Triton launches for NVIDIA GPUs on a machine without one (run by tests/test_ops.py).

Reads a JSON list of launches on stdin, each ``{"module", "kernel", "signature", "constexprs"}`` as
recorded under the interpreter (the signature in Triton's terms: "*fp32", "i32", "constexpr"), and
compiles each with Triton's own compiler (front end, LLVM, and the ptxas bundled with the triton
wheel) for every target in ``argv[1:]`` (compute capabilities, e.g. 80 90), down to a cubin. Prints a
JSON list: per launch and target, the kernel, the target, an error if compiling failed, and the PTX
instructions the "last program merges" pattern relies on (atomics, barriers, L2 loads).

Run without TRITON_INTERPRET: the kernels must be defined as compilable JITFunctions.
"""
import importlib
import json
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

PTX_OF_INTEREST = re.compile(r"\b(atom\.[\w.]+|bar\.sync|ld\.global\.cg\.\w+|fence\.[\w.]+)")


def constexprs(kernel, values: dict) -> dict:
    """{(index,): value} of a launch's constexpr parameters, from {name: [kind, value]} (kind "dtype":
    a triton.language dtype by name)."""
    return {(kernel.arg_names.index(name),): tl.dtype(value) if kind == "dtype" else value
            for name, (kind, value) in values.items()}


def main() -> None:
    targets = [int(cc) for cc in sys.argv[1:]]
    out = []
    for launch in json.load(sys.stdin):
        kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        sig, consts = launch["signature"], constexprs(kernel, launch["constexprs"])
        for cc in targets:
            row = {"kernel": launch["kernel"], "cc": cc, "signature": sig}
            try:
                compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                                          target=GPUTarget("cuda", cc, 32))
                row["ptx"] = sorted(set(PTX_OF_INTEREST.findall(compiled.asm["ptx"])))
                row["cubin_bytes"] = len(compiled.asm["cubin"])
            except Exception as err:  # noqa: BLE001 - reported per launch, for the test to name
                row["error"] = f"{type(err).__name__}: {err}"[-2000:]
            out.append(row)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
