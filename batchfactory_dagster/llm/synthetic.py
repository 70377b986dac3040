"""Deterministic synthetic chat completions.

Shared by the fake OpenAI server and the offline ``local`` provider, so it must stay
pure (no I/O), dependency-free and cheap: benchmarks call it ~100k times.

The reply text always starts with ``[synthetic]`` so it can never be mistaken for a
real model's output, carries a short tag derived from the request hash so tests can
tell answers apart, and reuses words of the last user message so dataset pipelines
downstream (parsers, dedup, length filters) see plausible, varied text.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "SYNTHETIC_CREATED",
    "SYNTHETIC_PREFIX",
    "canonical_body",
    "estimate_prompt_tokens",
    "estimate_tokens",
    "message_text",
    "synthetic_completion",
    "synthetic_tag",
    "synthetic_text",
]

SYNTHETIC_PREFIX = "[synthetic]"
# A fixed, plausible Unix time: a wall-clock value would break byte-for-byte determinism.
SYNTHETIC_CREATED = 1_700_000_000
# Per-message overhead of the chat format (role markers etc.), as in OpenAI's own estimate.
MESSAGE_OVERHEAD_TOKENS = 4
MAX_POEM_LINES = 40

_WORD_RE = re.compile(r"[A-Za-z][A-Za-z']{2,}")
_NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "fourteen": 14,
}  # fmt: skip
_LINES_RE = re.compile(
    r"\b(\d{1,2}|" + "|".join(_NUMBER_WORDS) + r")[-\u2010\u2011\u2012\u2013 ](?:line|verse|stanza-line)s?\b", re.I
)
_SENTENCES_RE = re.compile(r"\b(\d{1,2}|" + "|".join(_NUMBER_WORDS) + r")[- ]sentences?\b", re.I)
_FORM_LINES = {"haiku": 3, "limerick": 5, "couplet": 2, "quatrain": 4, "tercet": 3, "sonnet": 14}
_STOPWORDS = frozenset(
    """
    the and for with that this from into your you are was were have has had not but
    about above after again all also any can could does did doing each few more most
    other some such than then there these they them their what when where which while
    who whom why will would should shall may might must please write give make create
    generate produce return output answer respond reply using use line lines poem words
    word sentence sentences short long very just only its it's our out over under one
    two three four five six seven eight nine ten how her his she him here been being
    explain describe summarize summarise list tell why brief briefly based following
    """.split()
)
_FALLBACK_WORDS = (
    "river", "lantern", "harbor", "meadow", "signal", "copper", "garden", "winter",
    "market", "engine", "orchard", "compass", "thunder", "library", "harvest", "window",
)  # fmt: skip
_VERBS = (
    "carries", "remembers", "follows", "shelters", "answers", "gathers", "echoes",
    "outlasts", "illuminates", "awaits", "reshapes", "measures",
)  # fmt: skip
_ADJECTIVES = (
    "quiet", "distant", "bright", "patient", "restless", "golden", "hidden", "steady",
    "silver", "gentle", "ancient", "open",
)  # fmt: skip
_SENTENCE_TEMPLATES = (
    "The {a} {w1} {v} the {w2}.",
    "Every {w1} {v} a trace of {w2}.",
    "{W1} and {w2} meet where the {a} {w3} begins.",
    "In short, the {w1} {v} what the {w2} leaves behind.",
    "{art} {a} {w1} often {v} the {w2} more than expected.",
    "Consider how the {w1} {v} each {a} {w2}.",
)
_LINE_TEMPLATES = (
    "{art} {a} {w1} beneath the {w2}",
    "the {w1} {v} the {a} {w2}",
    "where {w1} and {w2} softly meet",
    "{art} {a} {w1} in {w2} light",
    "{W1} {v} the {w2} again",
    "and {a} {w1} turns to {w2}",
)


def estimate_tokens(text: str) -> int:
    """Rough token count (~4 characters per token), good enough for offline rate limits."""
    return math.ceil(len(text) / 4)


def message_text(message: Mapping[str, Any]) -> str:
    """Plain text of a chat message whose content is a string, a list of parts, or None."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = (p.get("text", "") if isinstance(p, Mapping) else str(p) for p in content)
        return " ".join(p for p in parts if isinstance(p, str))
    return str(content)


def estimate_prompt_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    """Prompt tokens: the text estimate of each message plus a fixed per-message overhead."""
    return sum(estimate_tokens(message_text(m)) + MESSAGE_OVERHEAD_TOKENS for m in messages)


def canonical_body(body: Mapping[str, Any]) -> bytes:
    """Key-order independent serialisation, so equal requests hash equally."""
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    ).encode()


def _digest(canonical: bytes, index: int) -> bytes:
    return hashlib.blake2b(canonical + b"#%d" % index, digest_size=16).digest()


def synthetic_tag(body: Mapping[str, Any], index: int = 0) -> str:
    """The stable 8-hex tag embedded in choice ``index`` of the reply to ``body``."""
    return _digest(canonical_body(body), index).hex()[:8]


def _last_user_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return message_text(message)
    # No user turn (e.g. system-only prompts): fall back to whatever text there is.
    return " ".join(message_text(m) for m in messages if isinstance(m, Mapping))


def _count(token: str) -> int:
    return int(token) if token.isdigit() else _NUMBER_WORDS[token.lower()]


@functools.lru_cache(maxsize=4096)
def _requested_lines(prompt: str) -> int | None:
    match = _LINES_RE.search(prompt)
    if match:
        return max(1, min(_count(match.group(1)), MAX_POEM_LINES))
    lowered = prompt.lower()
    for form, lines in _FORM_LINES.items():
        if form in lowered:
            return lines
    return None


@functools.lru_cache(maxsize=4096)
def _keywords(prompt: str) -> tuple[str, ...]:
    # Cached: pipelines ask the same prompt many times (n samples, seeds, retries).
    seen: dict[str, None] = {}
    for word in _WORD_RE.findall(prompt):
        lowered = word.lower()
        if lowered not in _STOPWORDS:
            seen.setdefault(lowered, None)
    words = list(seen)
    # Pad short prompts so one line never repeats a word ("leaves and leaves").
    return tuple(words if len(words) >= 3 else words + list(_FALLBACK_WORDS[: 3 - len(words)]))


class _Picker:
    """Cheap deterministic choices from hash bytes (``random.Random`` is ~3x slower here)."""

    __slots__ = ("_bytes", "_pos")

    def __init__(self, digest: bytes, needed: int) -> None:
        self._bytes = hashlib.shake_128(digest).digest(needed)
        self._pos = 0

    def index(self, size: int) -> int:
        value = self._bytes[self._pos]
        self._pos += 1
        return value % size

    def pick(self, items: tuple[str, ...] | list[str]) -> str:
        return items[self.index(len(items))]


def _fill(template: str, picker: _Picker, words: tuple[str, ...]) -> str:
    n = len(words)
    i1 = picker.index(n)
    # Offsets 1..n-1 keep w2 and w3 distinct from w1, so a line never reads "sea and sea".
    w2 = words[(i1 + 1 + picker.index(n - 1)) % n]
    w3 = words[(i1 + 1 + picker.index(n - 1)) % n]
    w1, a, v = words[i1], picker.pick(_ADJECTIVES), picker.pick(_VERBS)
    art = "an" if a[0] in "aeiou" else "a"
    return template.format(w1=w1, w2=w2, w3=w3, a=a, v=v, W1=w1.capitalize(), art=art)


def synthetic_text(prompt: str, digest: bytes) -> str:
    """Reply text for ``prompt``; ``digest`` (request hash) drives every choice."""
    words = _keywords(prompt)
    header = f"{SYNTHETIC_PREFIX} #{digest.hex()[:8]} "
    n_lines = _requested_lines(prompt)
    if n_lines is not None:
        picker = _Picker(digest, 6 * n_lines)
        lines = [_fill(picker.pick(_LINE_TEMPLATES), picker, words) for _ in range(n_lines)]
        lines[0] = lines[0][:1].upper() + lines[0][1:]
        return header + "\n".join(lines)
    match = _SENTENCES_RE.search(prompt)
    n_sentences = max(1, min(_count(match.group(1)), 20)) if match else 1 + digest[8] % 3
    picker = _Picker(digest, 6 * n_sentences)
    sentences = (_fill(picker.pick(_SENTENCE_TEMPLATES), picker, words) for _ in range(n_sentences))
    return header + " ".join(s[:1].upper() + s[1:] for s in sentences)


def _apply_stop(text: str, stop: Any) -> tuple[str, bool]:
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _choice(prompt: str, digest: bytes, index: int, body: Mapping[str, Any]) -> dict:
    text, _ = _apply_stop(synthetic_text(prompt, digest), body.get("stop"))
    finish_reason = "stop"
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and limit > 0 and estimate_tokens(text) > limit:
        # Mirror a real model hitting its budget: cut at the budget and say so.
        text, finish_reason = text[: limit * 4], "length"
    return {
        "index": index,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "logprobs": None,
        "finish_reason": finish_reason,
    }


def synthetic_completion(body: Mapping[str, Any]) -> dict:
    """A full, deterministic ``chat.completion`` response for an OpenAI request body."""
    canonical = canonical_body(body)
    messages = body.get("messages") or []
    prompt = _last_user_text(messages)
    n = body.get("n") or 1
    n = n if isinstance(n, int) and n > 0 else 1
    choices = [_choice(prompt, _digest(canonical, i), i, body) for i in range(n)]
    prompt_tokens = estimate_prompt_tokens(m for m in messages if isinstance(m, Mapping))
    completion_tokens = sum(estimate_tokens(c["message"]["content"]) for c in choices)
    return {
        "id": "chatcmpl-" + hashlib.blake2b(canonical, digest_size=12).hexdigest(),
        "object": "chat.completion",
        "created": SYNTHETIC_CREATED,
        "model": body.get("model") or "synthetic",
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "system_fingerprint": "fp_synthetic",
    }
