"""Who may read which cached KV: fingerprints, scopes, owners and their kinds, in one place.

A scope key covers the model fingerprint (weights, dtype, chat template, the disk format) and a
salt, so cached KV is never served to another model or outside its salt: each scope is its own
root of the radix tree. Inside a scope the tree matches token ids themselves, so a hash collision
can never serve the wrong KV.

Inside a scope every node has an owner:
- `SHARED`: a system prompt, readable by every request in the scope;
- `STATELESS`: turns of requests without a session (API clients resending their history), shared
  among those requests;
- `"session:" + session_hash(id)`: one session's own turns, readable by that session alone.
A request reads its own owner's nodes and the shared ones (`owners_for`). Session ids are hashed
once, here (`session_hash`): the tree, the disk tier and the usage log hold the hash, never the id.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NewType

import xxhash

from kvchat.records import CacheSource, NodeKind

Fingerprint = NewType("Fingerprint", str)  # xxh3_64 hex of what makes KV values comparable

SHARED = ""  # system prompts: shared by every request in the scope
STATELESS = "\x00stateless"  # requests without a session: shared among themselves in the scope
_SESSION = "session:"


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


def session_hash(session_id: str | None) -> str:
    """The only form in which kvchat keeps a session id: xxh3-128 hex ("" for no session)."""
    return "" if session_id is None else xxhash.xxh3_128_hexdigest(session_id.encode("utf-8"))


def owner_of(session_id: str | None) -> str:
    """Who owns the turns a request adds. Namespaced: no session id can name the shared or the
    stateless owner."""
    return STATELESS if session_id is None else _SESSION + session_hash(session_id)


def owners_for(session_id: str | None) -> tuple[str, ...]:
    """Whose nodes a request may read: system prompts, and its session's turns (or the stateless ones)."""
    return (SHARED, owner_of(session_id))


def kind_of(owner: str) -> NodeKind:
    """The word the stats, the log and the metrics use for an owner's nodes."""
    if owner == SHARED:
        return "prefix"
    return "stateless" if owner == STATELESS else "session"


def source_of(reused_owners: Iterable[str], owner: str) -> CacheSource:
    """Where a request's reuse came from: its own turns (session or stateless) when it reused any,
    else a shared system prompt, else nothing."""
    owners = set(reused_owners)
    if owner in owners and owner != SHARED:
        return kind_of(owner)
    return "prefix" if owners else "none"
