"""Training curves for TensorBoard: every number of every ``metrics.jsonl`` record, also written
as a TensorBoard scalar (``tensorboard --logdir RUN/tb``).

Tags are the record's keys, nested ones joined by ``/`` (``loss``, ``val_ppl``,
``seg_loss/1``, ``passkey/2``, ``gates/layers.0.gate/3``), at the record's ``step``. A resumed
run hides the events after its checkpoint (TensorBoard's purge step), as ``metrics.jsonl`` drops
their lines. Without the ``tensorboard`` package the run says so once and goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TB_FOLDER = "tb"


def scalars(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) of every number in ``record`` but its ``step`` (NaN too: TensorBoard shows
    where a run diverged)."""
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if not prefix and key == "step":
            continue
        if isinstance(value, dict):
            yield from scalars(value, tag + "/")
        elif isinstance(value, list | tuple):
            yield from scalars({str(i): v for i, v in enumerate(value)}, tag + "/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield tag, float(value)


class Curves:
    """A TensorBoard writer for one run's folder, or nothing (``enabled`` False, or no
    tensorboard installed). ``first_step``: events from an earlier run at or after it are
    hidden (the steps this run redoes)."""

    def __init__(self, folder: Path, first_step: int, enabled: bool,
                 say: Callable[[str], None]) -> None:
        self.writer: Any = None
        self.folder = folder
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            say("note: the tensorboard package is not installed, so no curves in "
                f"{folder} (pip install tensorboard; metrics.jsonl has every number)")
            return
        self.writer = SummaryWriter(str(folder), purge_step=first_step)

    def add(self, record: dict[str, Any]) -> None:
        if self.writer is None or "step" not in record:
            return
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
