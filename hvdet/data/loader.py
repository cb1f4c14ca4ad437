"""Data loaders: an infinite, exactly resumable training loader and a sharded evaluation loader.

    loader = TrainLoader(dataset, images_per_gpu=2, rank=comm.rank(), world_size=comm.size(), seed=0)
    loader.load_state_dict(checkpoint["loader"])      # optional: resume mid-epoch
    images, targets = next(loader)                    # lists, one entry per image
    checkpoint["loader"] = loader.state_dict()        # {"epoch", "position"}

Batches come from :class:`hvdet.data.samplers.EpochBatchSampler` (same permutation on all ranks,
disjoint shards, aspect-ratio groups); images are decoded and augmented in DataLoader workers.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from hvdet.data.coco import DataError
from hvdet.data.samplers import EpochBatchSampler, eval_shard


def collate_lists(batch):
    """Detection images differ in size: keep ``(images, targets)`` as lists (the model pads them)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


class _SeededItems(Dataset):
    """``dataset[(index, seed)]``: loads item ``index`` with torch's RNG seeded by ``seed``.

    The random transforms (scale choice, flip) draw from torch's global RNG; seeding it per sample
    makes them independent of worker count and order, so a resumed run sees identical batches.
    ``fork_rng`` puts the caller's RNG back, which matters when loading in the main process.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class TrainLoader:
    """Infinite iterator of ``(images, targets)`` batches of ``images_per_gpu`` for this rank.

    ``epoch`` and ``position`` (batches already taken from that epoch) are the whole state; the
    batches are the same on every rank count-wise, so rank 0's state is valid for all ranks.
    """

    def __init__(self, dataset, images_per_gpu: int, rank: int, world_size: int, seed: int = 0,
                 num_workers: int = 2, aspect_grouping: bool = True):
        aspect_ratios = getattr(dataset, "aspect_ratios", None) or [1.0] * len(dataset)
        try:
            self.sampler = EpochBatchSampler(aspect_ratios, images_per_gpu, rank, world_size, seed, aspect_grouping)
        except ValueError as err:  # too few images (or none): name the file they came from
            source = getattr(dataset, "ann_file", None)
            raise DataError(f"{source}: {err}" if source else str(err)) from None
        # Not persistent: each epoch starts fresh workers for the new sampler state; no stale prefetch.
        # Its own generator: DataLoader draws a worker base seed from it at every iter(); from the
        # global RNG that draw would shift the training loop's random stream (RPN/RoI sampling)
        # whenever a resumed run starts an iterator where the uninterrupted run did not.
        self.loader = DataLoader(_SeededItems(dataset), batch_sampler=self.sampler, num_workers=num_workers,
                                 collate_fn=collate_lists, pin_memory=torch.cuda.is_available(),
                                 generator=torch.Generator().manual_seed(seed))
        self.dataset, self.epoch, self.position = dataset, 0, 0
        self._iterator = None

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def __iter__(self):
        return self

    def __next__(self):
        if self.position == self.batches_per_epoch:
            self.epoch, self.position, self._iterator = self.epoch + 1, 0, None
        if self._iterator is None:
            self.sampler.epoch, self.sampler.start = self.epoch, self.position
            self._iterator = iter(self.loader)
        batch = next(self._iterator)
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(f"loader state {state} does not fit an epoch of {self.batches_per_epoch} batches "
                             f"(saved with another dataset, images_per_gpu or number of ranks?)")
        self.epoch, self.position = epoch, position
        self.close()

    def close(self) -> None:
        """Stop the current epoch's worker processes (they also stop when the loader is dropped)."""
        self._iterator = None


def build_eval_loader(dataset, images_per_gpu: int, rank: int, world_size: int, num_workers: int = 2) -> DataLoader:
    """This rank's shard of ``dataset`` in order, every image on exactly one rank, as list batches."""
    return DataLoader(dataset, batch_size=images_per_gpu, sampler=eval_shard(len(dataset), rank, world_size),
                      num_workers=num_workers, collate_fn=collate_lists)
