"""kvchat: a chat backend that never recomputes KV it already holds."""

from kvchat.engine import CacheStats, Engine
from kvchat.errors import Busy, GenerationError, InputError
from kvchat.generation import Generation
from kvchat.usage import Reply, Usage

__all__ = ["Busy", "CacheStats", "Engine", "Generation", "GenerationError", "InputError", "Reply", "Usage"]
