"""The toy collapse (issue 20): BN scales driven to <= 0 by the LAMB family's norm/bias handling.

    .venv/bin/python benchmarks/toy_collapse.py      # the sweep -> benchmarks/results/toy_collapse.json

A small conv + BN network (3 conv-BN-ReLU blocks, 32 channels, 8x8 inputs) learns a fixed random
teacher's labels with PMD-LAMB under the old study's large-batch schedule: lr = 0.4 x batch / 16 (the
linear rule from the demo's anchor), a 2-iteration warmup from 0.01 x lr, 48 steps. One batch is drawn
per step, so the batch only sets the lr and the gradient noise. Measured: the fraction of BN scales
(gamma, initialized to 1) that end at or below 0, for each way of handling norm and bias tensors:

* ``norm_bias_trust=False``: Apex FusedLAMB's exclusion. Those tensors take lr x alpha x m/sqrt(v), an
  absolute step of about lr x alpha per element whatever the tensor's size: 0.15 at batch 512, three
  times that in the first steps without bias correction (m/sqrt(v) = 0.1/sqrt(0.001) = 3.2 at t = 1);
* ``norm_bias_trust=True``: LargeDet Algorithm 1, every tensor under the trust ratio: the step is
  lr x alpha of the tensor's norm, shared over its elements;
* each with and without Adam's bias correction.

The default of ``solver.norm_bias_trust`` and ``solver.bias_correction`` comes from this sweep
(docs/optimizers.md); tests/test_optim.py runs one cell of it as a test.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hvdet.optim import PMDLAMB, param_groups
from hvdet.optim.schedules import linear_scaled_lr, warmup_factor

BASE_LR, REFERENCE_BATCH, STEPS, WARMUP = 0.4, 16, 48, 2


def _net(seed: int, width: int = 32, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    layers, cin = [], 3
    for _ in range(3):
        layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


def toy_collapse(batch: int, norm_bias_trust: bool, bias_correction: bool, seed: int = 0, steps: int = STEPS,
                 base_lr: float = BASE_LR, warmup_iters: int = WARMUP) -> dict:
    """Train the toy net once; the fraction of BN scales <= 0 at the end, and the last loss."""
    teacher, student = _net(1000 + seed), _net(seed)
    teacher.eval()
    lr = linear_scaled_lr(base_lr, batch, REFERENCE_BATCH)
    opt = PMDLAMB(param_groups(student, 5e-4, 0.0, norm_bias_trust=norm_bias_trust), lr=lr, alpha=0.012,
                  cycle_length=200, bias_correction=bias_correction, impl="reference")
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        x = torch.randn(batch, 3, 8, 8, generator=gen)
        with torch.no_grad():
            y = teacher(x).argmax(1)
        for g in opt.param_groups:
            g["lr"] = lr * warmup_factor(step, warmup_iters, 0.01)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(student(x), y)
        loss.backward()
        opt.step()
    loss = loss.detach()
    gammas = torch.cat([m.weight.detach() for m in student.modules() if isinstance(m, nn.BatchNorm2d)])
    return {"batch": batch, "base_lr": base_lr, "lr": lr, "warmup_iters": warmup_iters,
            "norm_bias_trust": norm_bias_trust, "bias_correction": bias_correction,
            "seed": seed, "gamma_nonpositive": float((gammas <= 0).float().mean()), "gamma_min": float(gammas.min()),
            "final_loss": float(loss)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256, 512], help="at the base lr 0.4")
    p.add_argument("--anchors", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2],
                   help="more base lrs, at the largest batch")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/toy_collapse.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows, start = [], time.perf_counter()
    print(f"{'batch':>5} {'lr':>6} {'trust':>5} {'bc':>5}  gammas<=0 (per seed)   min gamma  final loss")
    settings = [(b, BASE_LR) for b in args.batches] + [(max(args.batches), a) for a in args.anchors]
    for batch, base_lr in settings:
        for trust in (False, True):
            for bc in (False, True):
                runs = [toy_collapse(batch, trust, bc, seed, base_lr=base_lr) for seed in range(args.seeds)]
                rows += runs
                fr = " ".join(f"{r['gamma_nonpositive']:.2f}" for r in runs)
                print(f"{batch:>5} {runs[0]['lr']:>6.2f} {trust!s:>5} {bc!s:>5}  {fr:<22} "
                      f"{min(r['gamma_min'] for r in runs):>9.3f}  {max(r['final_loss'] for r in runs):.3f}")
    from benchmarks.provenance import provenance

    doc = {"benchmark": "toy_collapse", "steps": STEPS, "warmup_iters": WARMUP, "base_lr": BASE_LR,
           "reference_batch": REFERENCE_BATCH, "rows": rows, "elapsed_s": time.perf_counter() - start,
           **provenance()}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"toy_collapse: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
