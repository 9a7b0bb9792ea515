"""The KV storage: what the engine holds KV in, and the one place that builds transformers' caches.

- `KVRun`: the exact-size keys and values of one run of tokens, a tree node's payload. Shared by
  reference: every running request that uses a run reads the same tensors.
- `RowBuffer`: a running request's private KV (what no run holds yet: its uncached prompt tail and
  its reply), preallocated for the whole request so it never regrows.
- `kv_layout`: each layer's (KV heads, head dim), read from the tensors a real forward writes,
  never from config fields a family may name or use differently (Falcon's multi-query heads, a
  config that carries a field its model ignores).

How a forward reads these (cascade attention, or the model's own attention) is `attention.py`.
`BufferLayer` (a `DynamicCache` layer over preallocated buffers) stays for the bench's floor, the
cheapest single-request baseline we know. Bytes are counted from real storage, spare included.
"""

from __future__ import annotations

import math
import os
import weakref

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from kvchat.errors import InputError

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


def use_native_gqa(device: torch.device) -> None:
    """Let SDPA read grouped K/V heads directly on CPU instead of materialising repeated copies.

    transformers repeats K/V for every multi-token forward with a mask (a follow-up prefill on a
    held cache); with native GQA that forward took 17-23% less time at 2-4k tokens of history here.
    Decode (one token) already avoids the copy. transformers reads this switch only from the
    environment; an explicit setting by the user is kept. On CUDA a mask would push SDPA to its
    slow math kernel, so it is left off there.
    """
    if device.type == "cpu":
        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")


def check_supported(model: PreTrainedModel) -> None:
    """Refuse models with layers whose KV is not one key and one value per position (linear
    attention, state-space layers, chunked or compressed caches): kvchat cannot crop, share or
    count them. Sliding-window layers are served: kvchat keeps every position, and attention masks
    the window (`attention.py`)."""
    kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    if kinds - {DynamicLayer.__name__, DynamicSlidingWindowLayer.__name__}:
        raise InputError(
            f"kvchat serves models whose layers keep one key and value per position (full or "
            f"sliding-window attention); this {model.config.model_type} model has {sorted(kinds)}"
        )


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


# --- the engine's storage: runs shared by reference, private row buffers ---


_LAYOUTS: weakref.WeakKeyDictionary[PreTrainedModel, tuple[tuple[int, int], ...]] = weakref.WeakKeyDictionary()


def kv_layout(model: PreTrainedModel) -> tuple[tuple[int, int], ...]:
    """Each layer's (KV heads, head dim), read from the K/V tensors [1, H_kv, 1, D] that one
    token through the model writes into a stock cache (once per model, then remembered)."""
    if model not in _LAYOUTS:
        cache = DynamicCache(config=model.config)
        token = torch.zeros((1, 1), dtype=torch.long, device=model.device)
        with torch.inference_mode():
            model(input_ids=token, cache=cache, use_cache=True)
        _LAYOUTS[model] = tuple((layer.keys.shape[1], layer.keys.shape[-1]) for layer in cache.layers)
    return _LAYOUTS[model]


class KVRun:
    """Keys and values of a run of consecutive tokens, per layer [kv_heads, n, head_dim]: exact-size,
    except the larger side of a split, a view whose whole storage `nbytes` counts."""

    __slots__ = ("keys", "values")

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (*self.keys, *self.values))

    def split(self, at: int) -> tuple[KVRun, KVRun]:
        """Positions [0, at) and [at, n) as two runs. The smaller side is copied; the larger stays a
        view of this run's storage, which therefore stays alive and is counted whole (`nbytes`
        reads the storage): a split costs at most half the run, in time and in bytes."""
        def part(lo: int, hi: int | None, copy: bool) -> KVRun:
            take = (lambda t: t[:, lo:hi].clone()) if copy else (lambda t: t[:, lo:hi])
            return KVRun([take(k) for k in self.keys], [take(v) for v in self.values])

        head_is_smaller = at <= self.num_tokens - at
        return part(0, at, head_is_smaller), part(at, None, not head_is_smaller)


class RowBuffer:
    """A running request's private KV: preallocated per layer [kv_heads, capacity, head_dim]."""

    def __init__(self, model: PreTrainedModel, capacity_tokens: int, device: torch.device, dtype: torch.dtype) -> None:
        shapes = [(kv_heads, capacity_tokens, head_dim) for kv_heads, head_dim in kv_layout(model)]
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for shape in shapes]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for shape in shapes]
        self.num_tokens = 0

    @property
    def capacity_tokens(self) -> int:
        return self.keys[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (*self.keys, *self.values))

    def filled(self, layer: int, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys and values up to and including the `new_tokens` being fed."""
        end = self.num_tokens + new_tokens
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def append_run(self, run: KVRun, num_tokens: int) -> None:
        """Copy the first `num_tokens` positions of `run` after what the buffer holds."""
        end = self.num_tokens + num_tokens
        for mine, theirs in zip((*self.keys, *self.values), (*run.keys, *run.values), strict=True):
            mine[:, self.num_tokens : end].copy_(theirs[:, :num_tokens])
        self.num_tokens = end

    def take_run(self, num_tokens: int | None = None, start: int = 0) -> KVRun:
        """Turn `num_tokens` positions (all it holds by default) from `start` into an exact-size
        run, one tensor at a time, freeing each buffer tensor as soon as it is copied: at most
        `transient_nbytes` are ever held twice. The buffer is empty afterwards."""
        num_tokens = self.num_tokens - start if num_tokens is None else num_tokens
        keys, values = [], []
        for mine, theirs in ((self.keys, keys), (self.values, values)):
            for layer, buffer in enumerate(mine):
                theirs.append(buffer[:, start : start + num_tokens].clone())
                mine[layer] = buffer.new_empty((0,))
        self.num_tokens = 0
        return KVRun(keys, values)

    @staticmethod
    def transient_nbytes(num_tokens: int, bytes_per_token: int, layers: int) -> int:
        """Extra bytes `take_run` holds at its peak: one layer's keys (or values)."""
        return -(-num_tokens * bytes_per_token // (2 * layers))


def bytes_per_token(model: PreTrainedModel, device: torch.device, dtype: torch.dtype) -> int:
    """Bytes one position of KV takes, measured on a real one-token buffer."""
    return RowBuffer(model, 1, device, dtype).nbytes
