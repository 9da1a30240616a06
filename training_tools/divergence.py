"""Catch a run whose loss has blown up, before it spends its budget training a dead network.

Measured (docs/training.md, session 19): a teacher run at lr 1e-3 in bf16 went from a task loss of
0.24 to 3.2 in one step at step 2000 and stayed at 1.5-1.8 (a network that predicts about nothing)
for the remaining 3,000 steps; gradient clipping did not prevent it, and every later stage distilled
from the dead teacher. :class:`DivergenceWatch` sees that within ``patience`` steps.
"""

from __future__ import annotations

import collections
import math
import statistics

__all__ = ["DivergenceWatch"]


class DivergenceWatch:
    """Feed it one loss per optimizer step; :meth:`update` returns True once the run has diverged.

    A step is *bad* when its loss is not finite, or above ``factor`` x the median of the last
    ``window`` good steps (judged only once that many are known, so the fall of the loss during
    warm-up is never bad). ``patience`` bad steps in a row = diverged; one good step ends a spike.
    ``suspect`` is True while the latest step was bad: a run should not write a periodic checkpoint
    then, so that its newest checkpoint is from before the blow-up. ``factor`` 0 turns it off.
    """

    def __init__(self, factor: float = 4.0, patience: int = 30, window: int = 200) -> None:
        self.factor, self.patience = factor, patience
        self.good: collections.deque[float] = collections.deque(maxlen=window)
        self.bad_run = 0
        self.first_bad_step: int | None = None
        self.reference: float | None = None  # the median the first bad step of this run was judged by

    @property
    def suspect(self) -> bool:
        return self.bad_run > 0

    def update(self, step: int, loss: float) -> bool:
        """Record ``loss`` of ``step``; True when this is the ``patience``-th bad step in a row."""
        if self.factor <= 0:
            return False
        full = len(self.good) == self.good.maxlen
        median = statistics.median(self.good) if full else None
        bad = not math.isfinite(loss) or (median is not None and loss > self.factor * median)
        if not bad:
            self.good.append(loss)
            self.bad_run, self.first_bad_step, self.reference = 0, None, None
            return False
        if self.bad_run == 0:
            self.first_bad_step, self.reference = step, median
        self.bad_run += 1
        return self.bad_run >= self.patience

    def message(self, loss: float) -> str:
        """What happened, for the run's error."""
        against = (
            f" against a median of {self.reference:.3g} over the {len(self.good)} steps before"
            if self.reference is not None
            else ""
        )
        return (
            f"training diverged: the loss has been bad for {self.bad_run} steps in a row since step "
            f"{self.first_bad_step} (now {loss:.3g}{against})"
        )
