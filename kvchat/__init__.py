"""kvchat: a chat backend that never recomputes KV it already holds.

The engine's names are imported on first use: `import kvchat.config` (the launcher, the first page)
must not pull in torch and transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from kvchat.errors import Busy, GenerationError, InputError

if TYPE_CHECKING:
    from kvchat.engine import CacheStats, Engine
    from kvchat.generation import Generation
    from kvchat.records import Reply, Usage

_LAZY = {"CacheStats": "kvchat.engine", "Engine": "kvchat.engine", "Generation": "kvchat.generation",
         "Reply": "kvchat.records", "Usage": "kvchat.records"}  # fmt: skip

__all__ = ["Busy", "CacheStats", "Engine", "Generation", "GenerationError", "InputError", "Reply", "Usage"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvchat' has no attribute {name!r}")
