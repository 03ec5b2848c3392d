"""Optional TensorBoard logging for the trainers: scalars and images, a no-op when tensorboard is not installed.

The hook a trainer needs (`--tensorboard` on dcae train / train-diffusion):
    tb = TensorBoardLogger(run_dir / "tensorboard" if config.tensorboard and is_main else None)
    log = JsonlLog(path, tb)                           # mirrors every record with a step via tb.scalars
    tb.image(step, "val/samples", grid)                # (3, H, W) uint8, beside save_sample_grid
    log.close()                                        # closes tb, in the trainer's finally
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch


class TensorBoardLogger:
    """Writes TensorBoard event files under `log_dir`; `log_dir=None` (a non-main rank, or off) or a missing
    tensorboard package make every call a no-op, so trainers call it unconditionally."""

    def __init__(self, log_dir: str | os.PathLike | None):
        self.writer = None
        if log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            warnings.warn("tensorboard is not installed: --tensorboard logs nothing (pip install tensorboard)",
                          stacklevel=2)
            return
        self.writer = SummaryWriter(log_dir=str(log_dir))

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def scalars(self, step: int, values: dict[str, Any], prefix: str = "") -> None:
        """Every finite number in `values` as a scalar `prefix + key` at `step`; other values are skipped."""
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(prefix + key, value, global_step=step)

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """A (3, H, W) uint8 image (e.g. the validation sample grid) at `step`."""
        if self.writer is None:
            return
        if image.dtype != torch.uint8 or image.ndim != 3:
            raise ValueError(f"TensorBoardLogger.image wants a (3, H, W) uint8 tensor, got {tuple(image.shape)} "
                             f"{image.dtype}")
        self.writer.add_image(tag, image.cpu(), global_step=step, dataformats="CHW")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "TensorBoardLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
