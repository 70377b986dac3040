"""CacheFolder: a versioned project directory for caches and outputs.

``CacheFolder("quickstart", 1, 0, 0)`` is ``./data/quickstart_v1.0.0``. Every path it hands out
stays inside ``data_dir``: names and relative paths that would leave it (``..``, absolute paths,
symlinks pointing elsewhere) are refused. It never asks for confirmation on stdin (the
original blocked orchestrated runs that way), and it deletes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

from .errors import ConfigError

__all__ = ["CacheFolder"]


class CacheFolder:
    """``{data_dir}/{name}_v{major}.{minor}.{patch}``, created on construction."""

    def __init__(self, name: str, major: int, minor: int | None = None,
                 patch: int | None = None, *, data_dir: str | os.PathLike[str] | None = None
                 ) -> None:
        # BATCHFACTORY_DATA_DIR moves every project at once (CI, Dagster deployments).
        data_dir = data_dir or os.environ.get("BATCHFACTORY_DATA_DIR") or "./data"
        self.name = _check_name(name)
        self.version = _version(major, minor, patch)
        # Resolved once, so a later chdir does not move the project.
        self.data_dir = Path(data_dir).resolve()
        root = _inside(self.data_dir / f"{name}_{self.version}", self.data_dir, name)
        root.mkdir(parents=True, exist_ok=True)
        self._root = root

    @property
    def root(self) -> Path:
        return self._root

    def path(self, rel: str | os.PathLike[str]) -> Path:
        """The absolute path of ``rel`` inside the folder; its parent directories are created."""
        text = os.fspath(rel)
        pure = PurePath(text)
        if not text or pure.is_absolute() or ".." in pure.parts:
            raise ConfigError(f"CacheFolder {self.name!r}: {text!r} is not a relative path "
                              "inside the folder; use e.g. 'cache/llm.jsonl' (no '..', not "
                              "absolute, not empty)")
        target = _inside(self._root / text, self._root, text)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def __getitem__(self, rel: str | os.PathLike[str]) -> str:
        return str(self.path(rel))

    def __fspath__(self) -> str:
        return str(self._root)

    def __repr__(self) -> str:
        return f"CacheFolder({str(self._root)!r})"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise ConfigError(f"CacheFolder: the name must be a non-empty str, got {name!r}")
    if "/" in name or "\\" in name or PurePath(name).is_absolute():
        raise ConfigError(f"CacheFolder: the name {name!r} must be a plain name without path "
                          "separators; use data_dir= to choose where the folder lives")
    return name


def _version(major: int, minor: int | None, patch: int | None) -> str:
    parts = [major, minor, patch]
    for label, value in zip(("major", "minor", "patch"), parts):
        if value is None and label != "major":
            continue
        if type(value) is not int or value < 0:
            raise ConfigError(f"CacheFolder: the {label} version must be an int >= 0, "
                              f"got {value!r}")
    if minor is None and patch is not None:
        raise ConfigError(f"CacheFolder: patch version {patch!r} given without a minor version")
    return "v" + ".".join(str(p) for p in parts if p is not None)


def _inside(path: Path, base: Path, offending: str) -> Path:
    """``path`` with symlinks resolved, if it lies strictly inside ``base``; else ConfigError."""
    resolved = path.resolve()
    if resolved == base or not resolved.is_relative_to(base.resolve()):
        raise ConfigError(f"CacheFolder: {offending!r} would leave {str(base)!r} (it resolves "
                          f"to {str(resolved)!r}); use a path inside the folder")
    return resolved
