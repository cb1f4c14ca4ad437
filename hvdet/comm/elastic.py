"""Elastic training over Horovod elastic (Gloo controller): ranks may leave and join a running job.

    horovodrun -np 3 --min-np 2 --max-np 3 --host-discovery-script launch/discover_hosts.sh \\
        python train.py --config ... elastic.enabled=true

:func:`run` wraps a training loop as ``hvd.elastic.run`` does: the loop commits its state every few
iterations (:meth:`State.commit`); when a rank dies (the survivors' next collective raises
``HorovodInternalError``, which the shared-memory groups raise too when a peer's process is gone) or
the host list changes, every survivor shuts Horovod down and starts it again in the new world,
forgets every group and backend of the old one (:func:`hvdet.comm.reset`), calls ``on_reset`` (the
caller rebuilds what depends on the world: loader shards, BN groups, the plan), takes the last
committed state from the new rank 0, and calls the loop again. Work since the last commit is lost;
nothing else is, and the job is never restarted.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from hvdet.comm import groups, world


def _to_cpu(obj):
    """A deep copy with every tensor cloned to host memory (a commit must not alias live weights)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def run(loop: Callable, save: Callable[[], dict], load: Callable[[dict], None], on_reset: Callable[[], None],
        on_sync: Callable[[], None] = lambda: None):
    """Run ``loop(state)`` elastically; ``save()`` -> the state to commit (collective), ``load(state)``
    continues from it (local), ``on_reset()`` rebuilds what depends on the world after it changed (local),
    ``on_sync()`` runs where every rank of the new world meets (collectives allowed)."""
    hvd = world.hvd
    base, run_fn = world.elastic_api()

    class State(base):
        def __init__(self):
            # Nothing collective before sync: a rank that joins a running job builds its state while the
            # others already wait in sync (a collective here would meet theirs and hang or mismatch).
            self.saved = None
            self.loaded = False  # this rank continues from self.saved already (reset loaded it)
            super().__init__(bcast_object=world.broadcast_object, get_rank=world.rank)

        def save(self):
            self.saved = _to_cpu(save())

        def restore(self):
            pass  # on_reset and sync load the last commit in the new world

        def sync(self):
            # Every rank of the new world is here, survivors and newcomers alike. The commit comes from
            # the lowest rank that holds one (Horovod usually keeps rank 0 on a surviving host, but a
            # newcomer's empty state must never win); at the first start nobody holds one: commit now.
            holders = world.allgather_object(self.saved is not None)
            if not any(holders):
                self.save()
            root = holders.index(True) if any(holders) else 0
            self.saved = world.broadcast_object(self.saved if world.rank() == root else None, root_rank=root)
            if not self.loaded:  # survivors loaded this commit in reset (commits are collective: the same one)
                load(self.saved)
            self.loaded = False
            on_sync()

        def reset(self):
            groups.reset()
            on_reset()
            load(self.saved)
            self.loaded = True  # sync, if Horovod calls it (a rank joined), need not load it again

    def _reset():
        # A Horovod world again, as hvd.elastic's reset does, without dynamic process sets (elastic
        # worlds use the shared-memory and torch.distributed groups, and the global process set).
        # torch.distributed's groups go first: their ranks were the old world's.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        hvd.shutdown()
        hvd.init()

    state = State()
    return run_fn(loop, _reset)(state)
