"""Canonical JSON and content hashes: the basis of every idx and every cache key."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

__all__ = ["canonical_json", "content_hash", "short_hash", "hash_texts"]

_OPTS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def canonical_json(obj: Any) -> bytes:
    """Sorted-key compact JSON; equal values always give equal bytes."""
    return orjson.dumps(obj, option=_OPTS)


def content_hash(obj: Any) -> str:
    """Full sha256 hex of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def short_hash(obj: Any, length: int = 16) -> str:
    """A short, readable content hash for entry idx values."""
    return content_hash(obj)[:length]


def hash_texts(*texts: str) -> str:
    """Hash of several strings, length-prefixed so that ("ab","c") != ("a","bc")."""
    joined = "@".join(f"{len(t)}:{t}" for t in texts)
    return hashlib.sha256(joined.encode()).hexdigest()
