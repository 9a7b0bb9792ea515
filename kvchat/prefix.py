"""Content hashing of token-id prefixes, so identical system prompts share one cached KV.

A key covers the model fingerprint (weights, dtype, chat template) and an optional salt, so a cache
is never served to another model or outside its salt scope. Keys are only an index: callers must
compare the stored token ids before trusting a hit, because 64-bit hashes can collide.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from typing import NewType

import xxhash

PrefixKey = NewType("PrefixKey", str)  # "prefix:" + xxh3_64 hex of (fingerprint, salt, token ids)
Fingerprint = NewType("Fingerprint", str)  # xxh3_64 hex of what makes KV values comparable


def fingerprint(parts: Iterable[str]) -> Fingerprint:
    """Hash the things that change KV values (model identity, dtype, chat template)."""
    digest = xxhash.xxh3_64()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\x00")  # separator: ("ab", "c") must differ from ("a", "bc")
    return Fingerprint(digest.hexdigest())


def prefix_key(model: Fingerprint, token_ids: Sequence[int], salt: str = "") -> PrefixKey:
    """Key of the KV computed for exactly `token_ids` by the model named by `model`."""
    digest = xxhash.xxh3_64()
    digest.update(model.encode("ascii"))
    digest.update(b"\x00")
    digest.update(salt.encode("utf-8"))
    digest.update(b"\x00")
    digest.update(array("q", token_ids).tobytes())
    return PrefixKey("prefix:" + digest.hexdigest())


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading token ids the two sequences share."""
    limit = min(len(a), len(b))
    for i in range(limit):
        if a[i] != b[i]:
            return i
    return limit
