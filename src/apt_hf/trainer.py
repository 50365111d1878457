"""`APTTrainer`: a `transformers.Trainer` that runs APT's callback and reports its figures (spec K)."""

from __future__ import annotations

from typing import Optional

from transformers import Trainer

from .callback import APTCallback


class APTTrainer(Trainer):
    """Trainer for APT models.

    Adds an :class:`APTCallback` (reading the model's ``APTConfig``) unless one is passed, and merges the callback's
    sparsity / rank figures into every ``Trainer.log`` call *before* the reporting integrations see it, so
    ``report_to`` (TensorBoard, W&B, ...) receives ``apt/*`` metrics. ``Trainer.train()`` is not altered.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.apt_callback is None:
            self.add_callback(APTCallback())

    @property
    def apt_callback(self) -> Optional[APTCallback]:
        return next((c for c in self.callback_handler.callbacks if isinstance(c, APTCallback)), None)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        callback = self.apt_callback
        if callback is not None and self.model.training:
            logs = {**logs, **callback.pop_logs()}
        super().log(logs, *args, **kwargs)
