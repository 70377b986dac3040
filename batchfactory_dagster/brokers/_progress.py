"""A progress bar for dispatch: calls done of total, cache hits, tokens, cost, ETA.

Shown only when asked (interactive terminals by default); silent in tests, CI and Dagster,
where the same numbers go to logs and materialisation metadata instead.
"""

from __future__ import annotations

import time

from ..core.context import CallStats

__all__ = ["Progress"]


class Progress:
    def __init__(self, total: int, *, enabled: bool, desc: str) -> None:
        self._bar = None
        self._last = 0.0
        if enabled and total:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="call", leave=True, smoothing=0.1)

    def update(self, stats: CallStats) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        now = time.monotonic()
        if now - self._last > 0.5:  # postfix formatting is not free at 1,000 calls/s
            self._last = now
            self._postfix(stats)

    def _postfix(self, stats: CallStats) -> None:
        assert self._bar is not None
        cost = "?" if stats.cost_usd is None else f"${stats.cost_usd:.4f}"
        self._bar.set_postfix_str(f"{stats.total_tokens} tok, {cost}, {stats.failed} failed",
                                  refresh=False)

    def close(self, stats: CallStats | None = None) -> None:
        if self._bar is not None:
            if stats is not None:
                self._postfix(stats)  # the final totals, not the last throttled update
            self._bar.close()
