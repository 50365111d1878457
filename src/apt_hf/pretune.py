"""Pre-tuning pruning (spec D.6): static block salience over calibration batches, gathered before tuning starts.

:class:`~apt_hf.APTCallback` uses these at train start when ``APTConfig.pretune_density < 1``: it scores every head,
neuron and hidden dimension with the summed (static) salience of a few random training batches, prunes the model
physically to ``pretune_density`` in one shot, and lets the cubic schedule run from there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

import torch
from torch import nn

from .salience import SalienceCollector


def calibration_batches(dataset: Any, collate_fn: Callable[[list], dict], batch_size: int, num_batches: int,
                        seed: int, dataloader: Iterable | None = None) -> Iterator[dict]:
    """``num_batches`` batches of random training examples (spec D.6: ``pruning_batches x batch size``).

    Drawn from a seeded permutation of a map-style ``dataset`` and collated with the training ``collate_fn``, so
    the training data stream itself is not advanced (a run is the same with or without the calibration draw up to
    the pruning). An iterable dataset (no ``len``) falls back to the first ``num_batches`` of ``dataloader``.
    """
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        if dataloader is None:
            raise ValueError("Pre-tuning pruning needs a map-style training dataset or its dataloader.")
        yield from islice(iter(dataloader), num_batches)
        return
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g)[: batch_size * num_batches].tolist()
    for i in range(0, len(order), batch_size):
        yield collate_fn([dataset[j] for j in order[i:i + batch_size]])


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def gather_static_salience(model: nn.Module, collector: SalienceCollector, batches: Iterable[dict],
                           device: torch.device) -> int:
    """Forward and backward of the task loss on each batch, each batch's block salience (and kurtosis term) summed
    into ``collector`` (spec C.2 "static" mode). Returns how many batches counted (non-finite ones are dropped).

    Gradients are cleared afterwards, so the first optimizer step sees only its own batch.
    """
    was_training, was_static = model.training, collector.static
    model.train()
    collector.static = True
    collector.attach(collector.layout)
    counted = 0
    try:
        for batch in batches:
            out = model(**_to(batch, device))
            loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
            if loss is None:
                raise ValueError("Pre-tuning pruning needs the model to return a loss: the training batches must "
                                 "carry labels (or start/end positions for extractive QA).")
            loss.backward()
            counted += int(collector.end_step())
            model.zero_grad(set_to_none=True)
    finally:
        collector.detach()
        collector.static = was_static
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return counted


__all__ = ["calibration_batches", "gather_static_salience"]
