"""One error hierarchy for the whole library.

    BatchFactoryError
    ├── DefinitionError      composition time: bad `|`/wire, unwired port, invalid name, missing field
    ├── EntryError           one record: carries .op, .field, .entry (idx); user callbacks wrapped here
    │   └── DuplicateIdxError    two entries share an idx; names both origins
    ├── ConfigError          bad configuration: unknown provider, malformed model string, bad path
    ├── BrokerError          a call to an external service failed for good
    │   ├── RateLimited          429 after all attempts
    │   └── CallTimeout          no answer within the timeout
    ├── LedgerError          the on-disk ledger cannot be read or written (corrupt, read-only, disk full)
    └── IterationLimitError  a While ran out of iterations with entries still looping

Errors say where (op, field, entry), what was expected, what came, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "BatchFactoryError",
    "BrokerError",
    "CallTimeout",
    "ConfigError",
    "DefinitionError",
    "DuplicateIdxError",
    "EntryError",
    "IterationLimitError",
    "LedgerError",
    "RateLimited",
]


class BatchFactoryError(Exception):
    """Base class of every error this library raises on purpose."""


class DefinitionError(BatchFactoryError):
    """A pipeline is wrongly composed; raised by `|`, `wire()` or `compile()`."""

    def __init__(self, message: str, op: str | None = None) -> None:
        self.op = op
        super().__init__(f"op {op!r}: {message}" if op else message)


class EntryError(BatchFactoryError):
    """One entry could not be processed by one op."""

    def __init__(
        self, op: str, field: str | None, entry: str | None, problem: str, hint: str = ""
    ) -> None:
        self.op, self.field, self.entry, self.problem, self.hint = op, field, entry, problem, hint
        where = f"op {op!r}"
        if field is not None:
            where += f", field {field!r}"
        if entry is not None:
            where += f", entry {entry!r}"
        text = f"{where}: {problem}"
        if hint:
            text += f". {hint}"
        super().__init__(text)

    def __reduce__(self):  # keep attributes when pickled across Dagster processes
        return (type(self), (self.op, self.field, self.entry, self.problem, self.hint))


class DuplicateIdxError(EntryError):
    """Two entries in one batch share an idx."""


class ConfigError(BatchFactoryError):
    """A setting is invalid: an unknown provider, a malformed model string, a path outside data_dir."""


class BrokerError(BatchFactoryError):
    """A job failed for good after every allowed attempt."""


class RateLimited(BrokerError):
    """The provider kept answering 429."""


class CallTimeout(BrokerError):
    """The provider did not answer in time."""


class LedgerError(BatchFactoryError):
    """The ledger file cannot be read or written."""


class IterationLimitError(BatchFactoryError):
    """A While loop reached max_iterations while entries still satisfied its condition."""
