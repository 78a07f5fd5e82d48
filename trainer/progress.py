"""Progress output for logs that are not a terminal (cron mail, journald, kubectl logs).

`trainer.finetune.ConsoleProgress` redraws one terminal line per step; in a log file that is
one endless line. `LineProgress` writes a plain line every `every_pct` percent of the steps
instead. Both are callbacks taking the step event dict that `trainer.finetune.train` emits.
"""

from __future__ import annotations

import sys
from typing import IO, Any


class LineProgress:
    """Owns periodic one-line progress reports: step, epoch, loss, tokens/s, ETA."""

    def __init__(self, stream: IO[str] | None = None, *, every_pct: float = 10.0, prefix: str = "") -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.every_pct = every_pct
        self.prefix = prefix
        self._next_pct = 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        step, total = int(event["step"]), max(1, int(event["total_steps"]))
        pct = 100.0 * step / total
        if step != 1 and step < total and pct < self._next_pct:
            return
        self._next_pct = (pct // self.every_pct + 1) * self.every_pct
        eta = float(event.get("eta_s", 0.0))
        self.stream.write(
            f"{self.prefix}train step {step}/{total} ({pct:.0f}%) epoch {event.get('epoch', 1)} "
            f"loss {float(event['loss']):.4f} {float(event.get('tokens_per_s', 0.0)):.0f} tok/s "
            f"ETA {int(eta // 60)}:{int(eta % 60):02d}\n"
        )
        self.stream.flush()
