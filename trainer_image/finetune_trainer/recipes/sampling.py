"""Micro-batches of similar length, in an order that a resumed run repeats exactly."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices


class EpochSeededGroups(torch.utils.data.Sampler[int]):
    """transformers' length-grouped order (random megabatches, sorted by length within), drawn from
    a generator seeded with ``seed + epoch``.

    transformers' own ``LengthGroupedSampler`` draws from the global RNG when an epoch starts. A
    resumed run restores the RNG state of the checkpoint, not of the start of its epoch, so it would
    skip the trained batches of another order and train on the wrong examples. Seeded per epoch (the
    Trainer calls ``set_epoch`` through accelerate), every rank and every resume sees the same order,
    as with the seeded random sampler accelerate puts in place of a ``RandomSampler``.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    @classmethod
    def for_trainer(cls, lengths: Sequence[int], args: Any) -> EpochSeededGroups:
        """Groups of one optimiser step's examples (micro-batch x accumulation, as transformers
        groups them), seeded with the Trainer's ``data_seed`` (else its ``seed``)."""
        seed = args.seed if args.data_seed is None else args.data_seed
        return cls(lengths, args.train_batch_size * args.gradient_accumulation_steps, seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = get_length_grouped_indices(self.lengths, self.batch_size, generator=generator)  # type: ignore[no-untyped-call]
        return iter(order)
