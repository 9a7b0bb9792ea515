"""What makes cached KV comparable: the model fingerprint and the sharing scope.

A scope key covers the model fingerprint (weights, dtype, chat template) and a salt, so cached KV
is never served to another model or outside its salt. Inside a scope, `kv_tree` matches token ids
themselves, so a hash collision can never serve the wrong KV.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NewType

import xxhash

Fingerprint = NewType("Fingerprint", str)  # xxh3_64 hex of what makes KV values comparable


def fingerprint(parts: Iterable[str]) -> Fingerprint:
    """Hash the things that change KV values (model identity, dtype, chat template)."""
    digest = xxhash.xxh3_64()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\x00")  # separator: ("ab", "c") must differ from ("a", "bc")
    return Fingerprint(digest.hexdigest())


def scope_key(model: Fingerprint, salt: str = "") -> str:
    """The tree root for requests on `model` that share within `salt`."""
    digest = xxhash.xxh3_64()
    digest.update(model.encode("ascii"))
    digest.update(b"\x00")
    digest.update(salt.encode("utf-8"))
    return "scope:" + digest.hexdigest()
