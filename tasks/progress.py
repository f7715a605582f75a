"""A stage's progress bar in the Prefect UI (a progress artifact), safe to call anywhere.

Design decisions:
- Stages are plain functions callable without Prefect (``tasks.X.run(store, cfg, ...)``),
  so :class:`StageProgress` is a no-op outside a Prefect task or flow run: it looks for a
  run context once, at construction, and does nothing if there is none.
- Progress is reporting, never the work: every Prefect call is wrapped, a failure logs
  one warning and disables the bar for the rest of the stage; nothing raises into it.
- Updates are throttled (at most one every ``min_seconds``, unless the bar moved by at
  least ``min_step``) so a loop over a million records costs a few API calls, not a
  million. ``done()`` always writes 100%.
- The key is ``<stage>-progress`` (lowercase letters, digits, dashes, as Prefect requires),
  so the Artifacts page keeps one history per stage.
"""

from __future__ import annotations

import re
import time

from tasks.common import stage_logger


def progress_key(stage: str) -> str:
    """``<stage>-progress`` reduced to the characters Prefect accepts in an artifact key."""
    slug = re.sub(r"[^a-z0-9]+", "-", stage.lower()).strip("-") or "stage"
    return f"{slug}-progress"


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


class StageProgress:
    """A progress artifact for one stage run: ``update(fraction)`` with 0..1, then ``done()``."""

    def __init__(self, stage: str, description: str, *, min_seconds: float = 2.0, min_step: float = 0.01):
        self.stage, self.description = stage, description
        self.key = progress_key(stage)
        self.min_seconds, self.min_step = min_seconds, min_step
        self._log = stage_logger(stage)
        self._id = None
        self._last_fraction = 0.0
        self._last_time = 0.0
        self._finished = False
        try:
            if not _in_prefect_run():
                return
            from prefect.artifacts import create_progress_artifact

            self._id = create_progress_artifact(progress=0.0, key=self.key, description=description)
            self._last_time = time.monotonic()
        except Exception as e:  # reporting must never stop the stage
            self._disable(e)

    @property
    def active(self) -> bool:
        """True when updates reach a Prefect progress artifact."""
        return self._id is not None

    def update(self, fraction: float) -> None:
        """Report ``fraction`` (0..1, clamped); throttled, so call it as often as is convenient."""
        if self._id is None or self._finished:
            return
        fraction = min(max(float(fraction), 0.0), 1.0)
        now = time.monotonic()
        if fraction - self._last_fraction < self.min_step - 1e-9 and now - self._last_time < self.min_seconds:
            return
        if fraction <= self._last_fraction:
            return
        self._write(fraction)
        self._last_time = now

    def done(self) -> None:
        """Mark the stage complete (100%); further updates are ignored."""
        if self._id is None or self._finished:
            return
        self._write(1.0)
        self._finished = True

    def _write(self, fraction: float) -> None:
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._id, progress=round(100.0 * fraction, 2))
            self._last_fraction = fraction
        except Exception as e:
            self._disable(e)

    def _disable(self, error: Exception) -> None:
        self._id = None
        self._log.warning("%s: progress artifact disabled (%s: %s)", self.stage, type(error).__name__, error)
