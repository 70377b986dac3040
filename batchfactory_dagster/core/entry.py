"""Entry: the record that flows through a pipeline."""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["Entry"]


class Entry:
    """One record: an immutable ``idx``, a loop counter ``rev`` and a JSON-able ``data`` dict.

    ``origin`` is a short human description of where the entry was made (``"FromList item 3"``);
    it is not part of the data and only serves error messages (two entries with one idx name
    both origins).
    """

    __slots__ = ("_idx", "rev", "data", "origin")

    def __init__(
        self, idx: str, data: dict[str, Any] | None = None, rev: int = 0, origin: str = ""
    ) -> None:
        if not isinstance(idx, str) or not idx:
            raise TypeError(f"Entry idx must be a non-empty str, got {idx!r}")
        self._idx = idx
        self.rev = rev
        self.data = {} if data is None else data
        self.origin = origin

    @property
    def idx(self) -> str:
        return self._idx

    def copy(self, idx: str | None = None) -> Entry:
        """A deep copy, optionally under a new idx (used by ops that duplicate entries)."""
        return Entry(idx or self._idx, copy.deepcopy(self.data), self.rev, self.origin)

    def __getstate__(self) -> tuple:
        return (self._idx, self.rev, self.data, self.origin)

    def __setstate__(self, state: tuple) -> None:
        self._idx, self.rev, self.data, self.origin = state

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return (self._idx, self.rev, self.data) == (other._idx, other.rev, other.data)

    __hash__ = None  # type: ignore[assignment]  # mutable data: not hashable

    def __repr__(self) -> str:
        return f"Entry(idx={self._idx!r}, rev={self.rev}, data={self.data!r})"

    def to_dict(self) -> dict[str, Any]:
        return {"idx": self._idx, "rev": self.rev, "data": self.data}
