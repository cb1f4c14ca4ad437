"""AGVM: the Adaptive Gradient Variance Modulator (Xue et al., NeurIPS 2022; code: Sense-X/AGVM)."""
from __future__ import annotations

import math

import torch


def _comm():
    # Imported on use: hvdet.optim (the optimizers, schedules) works where Horovod is not installed.
    # A simulated rank's world (tests' ranks in threads, hvdet.comm.groups.simulated_world) stands in for
    # hvdet.comm: it has the size, rank, allreduce and consecutive_groups used here. None in a real run.
    from hvdet import comm
    return comm.groups.simulated() or comm


class AGVM:
    r"""Aligns the gradient variance of a detector's modules by scaling each module's learning rate.

    Every ``interval`` iterations from ``start_iter`` on, for each module M (the "module" key of the
    param groups, see :func:`hvdet.optim.param_groups` with ``per_module=True``):

        a_M, b_M  = mean gradient of M over the first and the second half of the ranks
        var_M     = 1 - cos(a_M, b_M)                                      # 1 if a norm is 0
        new_M     = sqrt(clamp(var_backbone / var_M, 0.5, 10))            # (+1e-6 on both, as upstream)
        scale_M   = momentum * scale_M + (1 - momentum) * new_M           # scale starts at 1, momentum 0.97
        lr(group) = schedule lr * scale_M                                  # group["lr_scale"] = scale_M

    Use with Horovod's DistributedOptimizer (:func:`hvdet.comm.distributed_optimizer`)::

        set_lr(opt, lr_at(it)); agvm.before_backward(it); loss.backward()
        opt.synchronize(); agvm.after_synchronize(it)
        with opt.skip_synchronize(): opt.step()

    Why the hooks: Horovod (or DDP, under comm.gradients=ddp) overwrites ``p.grad`` with the world
    mean during backward, so on due iterations tensor hooks copy each rank's *local* gradient into a
    flat buffer first. The world mean that Horovod computed is then reused: with two equal halves it
    is (a + b) / 2, so each rank gets the other half's mean as 2 * world_mean - own_half_mean, and a
    due iteration costs one half-world allreduce of the gradients plus one tiny allreduce of statistics (upstream also
    all-gathers both half means, the whole gradient, onto rank 0).
    Call :meth:`after_synchronize` before clipping or unscaling the gradients: it checks that
    ``p.grad`` really is the world mean of the captured gradients and says so if not.

    Works on top of SGD, AdamW, LAMB or PMD-LAMB (upstream's AdamW variant preconditions the
    gradients by Adam's v first; hvdet uses the raw gradients for every optimizer). It needs an even
    number of ranks, at least two.
    """

    REFERENCE = "backbone"

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, interval: int = 10,
                 start_iter: int = 0, momentum: float = 0.97, clamp: tuple[float, float] = (0.5, 10.0)):
        world = _comm().size()
        if world < 2 or world % 2:
            raise ValueError(f"AGVM needs an even number of ranks, at least two (this run has {world}): it estimates "
                             "each module's gradient variance from the mean gradients of two halves of the ranks. "
                             "Launch with horovodrun/mpirun -np 2 or more, or turn AGVM off.")
        if interval < 1 or start_iter < 0 or not 0.0 <= momentum < 1.0 or not 0.0 < clamp[0] <= clamp[1]:
            raise ValueError(f"AGVM: need interval >= 1, start_iter >= 0, 0 <= momentum < 1 and 0 < clamp[0] <= "
                             f"clamp[1]; got {interval}, {start_iter}, {momentum}, {clamp}")
        self.optimizer, self.model = optimizer, model
        self.interval, self.start_iter, self.momentum, self.clamp = interval, start_iter, momentum, tuple(clamp)
        self._layout = self._make_layout()
        if self.REFERENCE not in self._layout:
            raise ValueError(f"AGVM scales every module relative to the '{self.REFERENCE}' param group, which the "
                             f"optimizer lacks (modules: {list(self._layout)}); build it with per_module=True")
        in_model = {id(p) for p in model.parameters()}
        if any(id(p) not in in_model for _, params, _ in self._layout.values() for p in params):
            raise ValueError("AGVM: the optimizer holds parameters that are not the model's")
        for group in optimizer.param_groups:
            group.setdefault("lr_scale", 1.0)
        self.scales = {m: 1.0 for m in self._layout}
        self.last_variances: dict[str, float] = {}
        self._flat: torch.Tensor | None = None
        self._hooks: list = []
        self._armed_iter: int | None = None

    def _make_layout(self) -> dict:
        """{module: (first offset, params, numels)} in param-group order, the same on every rank."""
        by_module: dict[str, list] = {}
        for group in self.optimizer.param_groups:
            module = group.get("module", group.get("name", "all"))
            by_module.setdefault(module, []).extend(p for p in group["params"] if p.requires_grad)
        layout, offset = {}, 0
        for module, params in by_module.items():
            numels = [p.numel() for p in params]
            layout[module] = (offset, params, numels)
            offset += sum(numels)
        self._numel = offset
        return layout

    def due(self, iteration: int) -> bool:
        return iteration >= self.start_iter and iteration % self.interval == 0

    def before_backward(self, iteration: int) -> None:
        """On due iterations: capture this rank's local gradients during the coming backward pass(es)."""
        if not self.due(iteration) or self._armed_iter == iteration:
            return  # a second backward pass of the same iteration accumulates into the same buffer
        self._disarm()
        params = [p for _, ps, _ in self._layout.values() for p in ps]
        self._flat = torch.zeros(self._numel, dtype=torch.float32, device=params[0].device)
        start = 0
        for p in params:
            self._hooks.append(p.register_hook(self._capture(start, p.numel())))
            start += p.numel()
        self._armed_iter = iteration

    def _capture(self, start: int, numel: int):
        def hook(grad: torch.Tensor) -> None:
            # Copy now: Horovod allreduces p.grad in place, and p.grad may be this very tensor.
            self._flat[start:start + numel].add_(grad.detach().reshape(-1))
        return hook

    def _disarm(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._armed_iter = [], None

    @torch.no_grad()
    def after_synchronize(self, iteration: int) -> dict[str, float] | None:
        """Collective on due iterations (every rank must call it): update each group's lr_scale and lr.

        Returns the per-module variances on due iterations, None otherwise.
        """
        if not self.due(iteration):
            return None
        if self._armed_iter != iteration:
            raise RuntimeError(f"AGVM: iteration {iteration} is due but before_backward({iteration}) was not called "
                               "before loss.backward(), so the local gradients were not captured")
        local, self._flat = self._flat, None
        self._disarm()
        comm = _comm()
        world = comm.size()
        # Synchronization point: the mean over my half of the ranks (half the world, consecutive ranks).
        own_half = comm.consecutive_groups(world // 2).allreduce(local, op="mean")
        per_module = [self._module_stats(own_half, offset, params) for offset, params, _ in self._layout.values()]
        stats = torch.tensor(per_module, dtype=torch.float64)  # [modules, (sum h, var, sum s, sum |s|)]
        if comm.rank() != 0:
            stats[:, 1:] = 0.0  # rank 0's variances go to everyone: bitwise the same lr on every rank
        # Synchronization point: one tiny allreduce instead of a broadcast plus a check.
        stats = comm.allreduce(stats, op="sum")
        self._check_world_mean(stats, world, iteration)
        self.last_variances = dict(zip(self._layout, stats[:, 1].tolist(), strict=True))
        if all(math.isfinite(v) for v in self.last_variances.values()):
            self._update_scales()  # else (an AMP step with inf/NaN gradients, which the scaler skips): keep the scales
        return dict(self.last_variances)

    def _module_stats(self, own_half: torch.Tensor, offset: int, params: list) -> tuple:
        numel = sum(p.numel() for p in params)
        h = own_half[offset:offset + numel].double()
        s = torch.cat([p.grad.detach().reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=h.device)
                       for p in params]).double()  # the world mean, as Horovod wrote it
        other = 2.0 * s - h  # the other half's mean: world mean = (own + other) / 2
        h_norm, o_norm = h.norm().item(), other.norm().item()
        cos = torch.dot(h, other).item() / (h_norm * o_norm) if h_norm > 0 and o_norm > 0 else 0.0
        return (h.sum().item(), 1.0 - cos, s.sum().item(), s.abs().sum().item())

    def _check_world_mean(self, stats: torch.Tensor, world: int, iteration: int) -> None:
        mean_of_halves, world_mean, scale = stats[:, 0] / world, stats[:, 2], stats[:, 3]
        bad = (mean_of_halves - world_mean).abs() > 1e-3 * scale + 1e-12  # 1e-3 allows fp16 compression
        if bool(bad.any()):
            module = list(self._layout)[int(bad.nonzero()[0])]
            raise RuntimeError(
                f"AGVM at iteration {iteration}: p.grad of module '{module}' is not the mean over all ranks of the "
                "gradients captured in backward. Wrap the optimizer with hvdet.comm.distributed_optimizer, call "
                "opt.synchronize() and then agvm.after_synchronize() before clipping or rescaling gradients.")

    def _update_scales(self) -> None:
        low, high = self.clamp
        ref = self.last_variances[self.REFERENCE]
        for module, var in self.last_variances.items():
            new = math.sqrt(min(max((ref + 1e-6) / (var + 1e-6), low), high))
            self.scales[module] = self.momentum * self.scales[module] + (1.0 - self.momentum) * new
        self._apply_scales()

    def _apply_scales(self) -> None:
        """lr_scale for the schedule's next set_lr; lr rescaled now so this very step uses it."""
        for group in self.optimizer.param_groups:
            module = group.get("module", group.get("name", "all"))
            if module in self.scales:
                old, new = group.get("lr_scale", 1.0), self.scales[module]
                group["lr"] = group["lr"] / old * new
                group["lr_scale"] = new

    def state_dict(self) -> dict:
        return {"scales": dict(self.scales), "last_variances": dict(self.last_variances)}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state["scales"]) - set(self.scales)
        if unknown:
            raise ValueError(f"AGVM state has modules {sorted(unknown)} that this optimizer lacks "
                             f"({list(self.scales)})")
        self.scales.update(state["scales"])
        self.last_variances = dict(state.get("last_variances", {}))
        self._apply_scales()
