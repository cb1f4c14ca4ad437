"""Distributed sampling: a per-epoch permutation shared by all ranks, shards, aspect-ratio batches.

Everything here is a pure function of ``(seed, epoch, rank, world_size)``, so any rank can
recompute any epoch's batches without talking to the others, and a run resumed at
``(epoch, position)`` gets exactly the batches it would have had.

* Every rank draws the same permutation of the dataset, seeded by ``seed + epoch``; rank ``r``
  takes positions ``r, r + W, r + 2W, ...``. The permutation is first padded (by repeating its
  start) to a multiple of ``W``, so every rank has the same number of images and hence batches:
  ranks run collectives every step and must not run out at different times.
* Aspect-ratio grouping (as in torchvision's detection references): images with ``w/h < 1`` and
  ``w/h >= 1`` are batched separately, so a padded batch wastes little area. The one leftover
  mixed batch at the end keeps the batch count at ``len(shard) // images_per_gpu`` on every rank.
* Each sample also gets its own augmentation seed from ``(seed, epoch, index)``: the random scale
  and flip do not depend on which worker or rank loads it, nor on a resume.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

_MIX = 1_000_003  # a prime; mixes (seed, epoch, index) into one augmentation seed


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The same shuffled order of ``range(num_samples)`` on every rank (seeded by seed + epoch)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


def shard_indices(num_samples: int, rank: int, world_size: int, seed: int, epoch: int) -> list[int]:
    """This rank's images for ``epoch``: a strided slice of the padded shared permutation."""
    _check_rank(rank, world_size)
    order = epoch_permutation(num_samples, seed, epoch)
    padded_len = -(-num_samples // world_size) * world_size
    # Equal shards: repeat the order (more than twice when there are fewer images than ranks).
    order = (order * -(-padded_len // num_samples))[:padded_len]
    return order[rank::world_size]


def group_batches(indices: Sequence[int], aspect_ratios: Sequence[float], images_per_gpu: int,
                  aspect_grouping: bool = True) -> list[list[int]]:
    """``len(indices) // images_per_gpu`` batches, each (but possibly the last) of one aspect group."""
    if not aspect_grouping:
        full = len(indices) // images_per_gpu * images_per_gpu
        return [list(indices[i:i + images_per_gpu]) for i in range(0, full, images_per_gpu)]
    pending = {False: [], True: []}  # landscape-or-square? -> indices waiting for a batch
    batches = []
    for index in indices:
        group = pending[aspect_ratios[index] >= 1.0]
        group.append(index)
        if len(group) == images_per_gpu:
            batches.append(group.copy())
            group.clear()
    leftover = pending[False] + pending[True]  # < 2 batches' worth: at most one more batch
    if len(leftover) >= images_per_gpu:
        batches.append(leftover[:images_per_gpu])
    return batches


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset item ``index`` in ``epoch``."""
    return ((seed * _MIX + epoch) * _MIX + index) % (2 ** 63)


def eval_shard(num_samples: int, rank: int, world_size: int) -> list[int]:
    """Evaluation: every image exactly once over all ranks (no padding: duplicates would count twice)."""
    _check_rank(rank, world_size)
    return list(range(rank, num_samples, world_size))


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(index, augmentation_seed)`` for one rank; set ``epoch`` and ``start`` then iterate.

    ``start`` skips the first batches of the epoch (resume); nothing is loaded to skip them.
    """

    def __init__(self, aspect_ratios: Sequence[float], images_per_gpu: int, rank: int, world_size: int,
                 seed: int = 0, aspect_grouping: bool = True):
        _check_rank(rank, world_size)
        if images_per_gpu < 1:
            raise ValueError(f"images_per_gpu must be >= 1, got {images_per_gpu}")
        self.aspect_ratios, self.images_per_gpu = list(aspect_ratios), images_per_gpu
        self.rank, self.world_size, self.seed, self.aspect_grouping = rank, world_size, seed, aspect_grouping
        self.epoch, self.start = 0, 0
        self.batches_per_epoch = -(-len(self.aspect_ratios) // world_size) // images_per_gpu
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(self.aspect_ratios)} images cannot fill one batch of {images_per_gpu} "
                             f"images on each of {world_size} ranks")

    def batches(self, epoch: int) -> list[list[int]]:
        shard = shard_indices(len(self.aspect_ratios), self.rank, self.world_size, self.seed, epoch)
        return group_batches(shard, self.aspect_ratios, self.images_per_gpu, self.aspect_grouping)

    def __iter__(self):
        for batch in self.batches(self.epoch)[self.start:]:
            yield [(index, sample_seed(self.seed, self.epoch, index)) for index in batch]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
