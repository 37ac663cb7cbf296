"""Batches of normalised (and optionally augmented) images from an ImageSource.

In-memory sources are batched in-process by indexing the whole uint8 tensor (no per-sample
Python, and on a GPU the dataset is uploaded once); folder sources decode files in DataLoader
workers. Either way augmentation and normalisation run batch-wise on the target device, and
the order and augmentation depend only on (seed, epoch).

Under torchrun (``world`` > 1) rank r of W takes every W-th item of the epoch's permutation,
as DistributedSampler does: with the per-rank batch ``B / W``, step i of all ranks together
covers exactly the items of step i of one process with batch ``B``, each augmented as there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from fct.data.augment import RankDraws, simclr_views, supervised_augment
from fct.data.base import ImageSource
from fct.errors import FCTError
from fct.registry import did_you_mean
from fct.seeding import derive_seed

AUGMENTS = ("supervised", "simclr")

Batch = tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor]


def _augment_seed(seed: int, epoch: int) -> int:
    """A seed for augmentation independent of the shuffling stream (which uses seed + epoch)."""
    return derive_seed("augment", seed, epoch)


class BatchLoader:
    """An iterable of batches ``(x, y)``, or ``((x1, x2), y)`` for SimCLR views.

    ``x`` is float32 [B,C,H,W] normalised with the source's mean/std, on ``device``; ``y`` is
    int64 [B]. Iterating twice gives the same batches; call ``set_epoch`` to move on.
    """

    def __init__(
        self,
        source: ImageSource,
        batch_size: int,
        shuffle: bool,
        seed: int,
        augment: str | None,
        device: torch.device,
        drop_last: bool,
        epoch: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.source = source
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.augment = augment
        self.device = device
        self.drop_last = drop_last
        self.epoch = epoch
        self.rank = rank
        self.world = world
        shape = (1, source.channels, 1, 1)
        self._mean = torch.tensor(source.mean, dtype=torch.float32, device=device).view(shape)
        self._std = torch.tensor(source.std, dtype=torch.float32, device=device).view(shape)

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffling order and augmentation of ``epoch`` from the next iteration on."""
        self.epoch = epoch

    def _items(self) -> int:
        """Items this rank sees per epoch (all of them for one process)."""
        return len(self.source) // self.world if self.world > 1 else len(self.source)

    def __len__(self) -> int:
        n = self._items()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(_augment_seed(self.seed, self.epoch))
        if self.world > 1:  # each image augmented as in one process (fct.data.augment)
            gen = RankDraws(gen, self.rank, self.world)
        for images, labels in self._uint8_batches():
            yield self._finish(images, labels, gen)

    def _uint8_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Raw uint8 image batches [B,C,H,W] with int64 labels, in this epoch's order."""
        raise NotImplementedError

    def _finish(
        self, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator | RankDraws
    ) -> Batch:
        """Move to the device, scale to [0, 1], augment, normalise."""
        x = images.to(self.device, non_blocking=True).float().div_(255)
        y = labels.to(self.device, non_blocking=True)
        if self.augment == "simclr":
            first, second = simclr_views(x, gen)
            return (self._normalize(first), self._normalize(second)), y
        if self.augment == "supervised":
            x = supervised_augment(x, gen)
        return self._normalize(x), y

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.sub_(self._mean).div_(self._std)


class TensorBatchLoader(BatchLoader):
    """Batches sliced from an in-memory source's uint8 tensor."""

    _images: torch.Tensor | None = None

    def _uint8_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._images is None:  # uploaded once per loader, reused by every epoch
            self._images = self.source.images.to(self.device)
            self._labels = torch.from_numpy(self.source.labels).to(self.device)
        n = len(self.source)
        if self.world == 1 and not self.shuffle:  # contiguous slices are views: no copy at all
            stop = n - n % self.batch_size if self.drop_last else n
            for start in range(0, stop, self.batch_size):
                end = start + self.batch_size
                yield self._images[start:end], self._labels[start:end]
            return
        if self.shuffle:
            gen = torch.Generator().manual_seed(derive_seed("shuffle", self.seed, self.epoch))
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if self.world > 1:  # DistributedSampler's split (drop_last): every W-th item
            order = order[: self._items() * self.world][self.rank :: self.world]
        order = order.to(self.device)
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for start in range(0, stop, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self._images[idx], self._labels[idx]


class FolderBatchLoader(BatchLoader):
    """Batches decoded from files by a torch DataLoader (workers, pinned memory on CUDA)."""

    def __init__(self, *args, num_workers: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Re-seeded before every iteration so the order depends only on (seed, epoch).
        self._gen = torch.Generator()
        self._sampler = None
        if self.world > 1:
            # Same permutation as one process (randperm seeded with seed + epoch), split.
            self._sampler = torch.utils.data.DistributedSampler(
                self.source,
                num_replicas=self.world,
                rank=self.rank,
                shuffle=self.shuffle,
                seed=self.seed,
                drop_last=True,
            )
        self._loader = torch.utils.data.DataLoader(
            self.source,
            batch_size=self.batch_size,
            shuffle=self.shuffle if self._sampler is None else None,
            sampler=self._sampler,
            generator=self._gen if self._sampler is None else None,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
            drop_last=self.drop_last,
        )

    def _uint8_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._gen.manual_seed(derive_seed("shuffle", self.seed, self.epoch))
        if self._sampler is not None:
            self._sampler.set_epoch(self.epoch)
        yield from self._loader


def make_loader(
    source: ImageSource,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    augment: str | None = None,
    device: str | torch.device = "cpu",
    drop_last: bool = False,
    num_workers: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world: int = 1,
) -> BatchLoader:
    """An iterable over normalised batches of ``source`` (see ``BatchLoader``).

    ``augment`` is None, "supervised" (padded random crop + flip) or "simclr" (two views per
    batch). ``num_workers`` only applies to folder sources: in-memory ones need no workers.
    ``len(loader)`` is the number of batches. ``rank``/``world``: this process's share of a
    distributed run (``batch_size`` is then the per-rank batch).
    """
    if augment is not None and augment not in AUGMENTS:
        raise FCTError(
            f"unknown augmentation '{augment}'{did_you_mean(str(augment), AUGMENTS)}; "
            f"use one of {', '.join(AUGMENTS)} or none"
        )
    if batch_size < 1:
        raise FCTError(f"batch size must be at least 1, got {batch_size}")
    if seed < 0 or epoch < 0:
        raise FCTError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    if not 0 <= rank < world:
        raise FCTError(f"rank {rank} is outside 0..{world - 1}")
    common = (source, batch_size, shuffle, seed, augment, torch.device(device), drop_last, epoch)
    if source.images is not None:
        return TensorBatchLoader(*common, rank=rank, world=world)
    return FolderBatchLoader(*common, rank=rank, world=world, num_workers=num_workers)
