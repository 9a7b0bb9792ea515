"""A `DynamicCache` over preallocated buffers, and helpers around it: only the bench and scripts use
it, for the cheapest single-request baseline we know (the floor: `generate`-style decoding over one
cache that never regrows). The engine stores KV in `kvchat.kv.runs` instead.
"""

from __future__ import annotations

import math

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

GROWTH_TOKENS = 256  # capacity grows in multiples of this many positions


class BufferLayer(DynamicLayer):
    """A full-attention layer whose K/V live in buffers [batch, kv_heads, capacity, head_dim]."""

    def __init__(self, reserve_tokens: int = 0) -> None:
        super().__init__()
        self.reserve_tokens = reserve_tokens  # capacity to allocate on first use
        self.num_tokens = 0
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.num_tokens + key_states.shape[-2]
        self._ensure_capacity(end, key_states, value_states)
        self._kbuf[:, :, self.num_tokens : end].copy_(key_states)
        self._vbuf[:, :, self.num_tokens : end].copy_(value_states)
        self._set_length(end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.num_tokens

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        self._set_length(max(0, self.num_tokens + tokens_to_remove))

    def reset(self) -> None:
        self._set_length(0)

    @property
    def capacity_tokens(self) -> int:
        return 0 if self._kbuf is None else self._kbuf.shape[-2]

    def storage_nbytes(self) -> int:
        if self._kbuf is None:
            return 0
        return self._kbuf.untyped_storage().nbytes() + self._vbuf.untyped_storage().nbytes()

    def copy_from(self, other: BufferLayer, num_tokens: int, reserve_tokens: int) -> None:
        """Become an independent copy of the first `num_tokens` positions of `other`, with room
        for `reserve_tokens` more; with no reserve the copy is exactly `num_tokens` long."""
        self.reserve_tokens = num_tokens + reserve_tokens
        if other._kbuf is None or num_tokens == 0:
            return
        self.device = other.device
        self.is_initialized = True
        self._ensure_capacity(num_tokens, other._kbuf, other._vbuf, round_up=reserve_tokens > 0)
        self._kbuf[:, :, :num_tokens].copy_(other._kbuf[:, :, :num_tokens])
        self._vbuf[:, :, :num_tokens].copy_(other._vbuf[:, :, :num_tokens])
        self._set_length(num_tokens)

    def _ensure_capacity(
        self, needed: int, like_k: torch.Tensor, like_v: torch.Tensor, round_up: bool = True
    ) -> None:
        if needed <= self.capacity_tokens:
            return
        target = max(needed, self.reserve_tokens, math.ceil(self.capacity_tokens * 1.5))
        capacity = -(-target // GROWTH_TOKENS) * GROWTH_TOKENS if round_up else target
        batch, heads, _, head_dim = like_k.shape
        kbuf = like_k.new_empty((batch, heads, capacity, head_dim))  # [B, H_kv, capacity, D]
        vbuf = like_v.new_empty((batch, like_v.shape[1], capacity, like_v.shape[-1]))
        if self._kbuf is not None and self.num_tokens:
            kbuf[:, :, : self.num_tokens].copy_(self._kbuf[:, :, : self.num_tokens])
            vbuf[:, :, : self.num_tokens].copy_(self._vbuf[:, :, : self.num_tokens])
        self._kbuf, self._vbuf = kbuf, vbuf

    def _set_length(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens
        if self._kbuf is None:
            self.keys = self.values = None
            return
        self.keys = self._kbuf[:, :, :num_tokens]  # views: the model reads only filled positions
        self.values = self._vbuf[:, :, :num_tokens]


def new_cache(model: PreTrainedModel, reserve_tokens: int = 0) -> DynamicCache:
    """An empty cache for `model` that will hold `reserve_tokens` without reallocating."""
    cache = DynamicCache(config=model.config)
    cache.layers = [BufferLayer(reserve_tokens) for _ in cache.layers]
    return cache


def clone(
    model: PreTrainedModel, cache: DynamicCache, num_tokens: int | None = None, reserve_tokens: int = 0
) -> DynamicCache:
    """An independent copy of the first `num_tokens` positions (all by default), with room for
    `reserve_tokens` more. Writes to the copy never touch the original."""
    length = num_tokens_of(cache) if num_tokens is None else num_tokens
    if length > num_tokens_of(cache):
        raise RuntimeError(f"cannot clone {length} tokens from a cache of {num_tokens_of(cache)}")
    copy = new_cache(model)
    for mine, theirs in zip(copy.layers, cache.layers, strict=True):
        mine.copy_from(theirs, length, reserve_tokens)
    return copy


def reserve(cache: DynamicCache, num_tokens: int) -> None:
    """Make room for `num_tokens` positions in total before a prefill, so decode never regrows."""
    for layer in cache.layers:
        layer.reserve_tokens = max(layer.reserve_tokens, num_tokens)


def truncate_to(cache: DynamicCache, num_tokens: int) -> None:
    """Keep the first `num_tokens` positions (crop after an edit, retry or undo)."""
    current = num_tokens_of(cache)
    if num_tokens > current:
        raise RuntimeError(f"cannot truncate a cache of {current} tokens to {num_tokens}")
    if num_tokens < current:
        cache.crop(num_tokens - current)


def capacity_tokens(cache: DynamicCache) -> int:
    """Positions every layer can hold without reallocating."""
    return min(layer.capacity_tokens for layer in cache.layers)


def num_tokens_of(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def kv_nbytes(cache: DynamicCache) -> int:
    """Real bytes held by every layer's key and value storage."""
    return sum(layer.storage_nbytes() for layer in cache.layers)
