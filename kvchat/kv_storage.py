"""The KV storage boundary: the only module that knows transformers' cache and attention internals.

How the engine holds KV (see `kv_tree.py` for why a tree):
- `KVRun`: the exact-size keys and values of one run of tokens, a tree node's payload. Shared by
  reference: every running request that uses a run reads the same tensors.
- `RowBuffer`: a running request's private KV (what no run holds yet: its uncached prompt tail and
  its reply), preallocated for the whole request so it never regrows.
- `SegmentedForward`: one model forward over many requests at once. Their tokens are laid end to
  end in one sequence; each request attends to its shared runs and then its own buffer. Attention
  is computed per segment with the log-sum-exp of each, then merged (cascade attention): a run
  shared by several requests is read once for all of them, and no prefix is ever copied.
  The attention function is registered in place of transformers' "sdpa" and falls back to it for
  every call that is not ours, so `generate` and other users of the same model are untouched.

`BufferLayer` (a `DynamicCache` layer over preallocated buffers) stays for the bench's floor, the
cheapest single-request baseline we know. Bytes are counted from real storage, spare included.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

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
    """Refuse models whose layers are not all plain full attention (sliding windows, linear
    attention): their caches cannot be cropped back to an arbitrary earlier position."""
    kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    if kinds - {DynamicLayer.__name__}:
        raise InputError(
            f"kvchat needs a model whose layers all use full attention; this one has {sorted(kinds)}"
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


# --- the engine's storage: runs shared by reference, private row buffers, segmented attention ---


def kv_shape(model: PreTrainedModel) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder-only transformer."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim


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
        layers, kv_heads, head_dim = kv_shape(model)
        shape = (kv_heads, capacity_tokens, head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(layers)]
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


@dataclass(slots=True)
class Row:
    """One request's part of a forward: its shared runs (root first), its buffer, the ids fed now."""

    runs: list[KVRun]
    buffer: RowBuffer
    token_ids: list[int]

    @property
    def start_position(self) -> int:
        return sum(run.num_tokens for run in self.runs) + self.buffer.num_tokens


@dataclass(slots=True)
class _Group:
    """A run read by one or more rows at the same depth: their queries attend to it in one call."""

    run: KVRun
    depth: int
    spans: list[tuple[int, int]]
    index: torch.Tensor | None = None  # query positions, when more than one span


@dataclass(slots=True)
class _Plan:
    rows: list[Row]
    spans: list[tuple[int, int]]  # each row's positions in the flat sequence
    groups: list[_Group]
    masks: list[torch.Tensor | None]  # per row: causal mask over its buffer when it feeds > 1 token
    depth: int  # most runs any row reads (partial results per query: depth + 1)
    outs: torch.Tensor | None = None  # [depth + 1, H_kv, G, N, D] partial outputs, reused by every layer
    lses: torch.Tensor | None = None  # [depth + 1, H_kv, G, N] their log-sum-exps (-inf where no segment)


class SegmentedForward:
    """Runs one forward over many requests; see the module docstring."""

    def __init__(self, model: PreTrainedModel, device: torch.device) -> None:
        _install_attention()
        self.model = model
        self.device = device
        _, self.kv_heads, self.head_dim = kv_shape(model)
        self.groups_per_kv_head = model.config.num_attention_heads // self.kv_heads
        self.use_flash_cpu = device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")

    def __call__(self, rows: list[Row]) -> torch.Tensor:
        """Feed each row's `token_ids` after what it holds; returns each row's last logits [rows, vocab]."""
        plan = self._plan(rows)
        ids = [t for row in rows for t in row.token_ids]
        positions = [p for row in rows for p in range(row.start_position, row.start_position + len(row.token_ids))]
        last = torch.tensor([end - 1 for _, end in plan.spans], device=self.device)
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            position_ids=torch.tensor([positions], device=self.device),
            attention_mask=_NO_MASK,  # a 4D mask is passed through untouched: no causal mask is built
            use_cache=False,
            logits_to_keep=last,
            kvchat_plan=plan,
            kvchat_forward=self,
        )
        for row in rows:
            row.buffer.num_tokens += len(row.token_ids)
        return out.logits[0]

    def _plan(self, rows: list[Row]) -> _Plan:
        spans, groups, masks = [], {}, []
        start = 0
        for row in rows:
            n = len(row.token_ids)
            if n == 0:
                raise ValueError("every row must feed at least one token")
            if row.buffer.num_tokens + n > row.buffer.capacity_tokens:
                raise RuntimeError("a row's buffer is full: its request reserved too little")
            span = (start, start + n)
            spans.append(span)
            for depth, run in enumerate(row.runs):
                group = groups.setdefault(id(run), _Group(run, depth, []))
                group.spans.append(span)
            masks.append(self._causal_mask(row.buffer.num_tokens, n) if n > 1 else None)
            start += n
        for group in groups.values():
            if len(group.spans) > 1:
                group.index = torch.cat([torch.arange(a, b) for a, b in group.spans]).to(self.device)
        depth = max((len(row.runs) for row in rows), default=0)
        plan = _Plan(rows, spans, list(groups.values()), masks, depth)
        if depth:  # every layer writes the same positions, so the -inf left elsewhere holds for all
            shape = (depth + 1, self.kv_heads, self.groups_per_kv_head, start)
            plan.outs = torch.zeros((*shape, self.head_dim), device=self.device, dtype=self.model.dtype)
            plan.lses = torch.full(shape, float("-inf"), device=self.device, dtype=torch.float32)
        return plan

    def _causal_mask(self, held: int, n: int) -> torch.Tensor:
        """Additive mask [1, 1, G*n, held+n]: new token i sees the buffer up to its own position."""
        allowed = torch.arange(held + n, device=self.device)[None, :] <= held + torch.arange(n, device=self.device)[:, None]
        mask = torch.zeros(allowed.shape, device=self.device, dtype=self.model.dtype).masked_fill(~allowed, float("-inf"))
        return mask.repeat(self.groups_per_kv_head, 1)[None, None]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """Attention for one layer: query [1, H, N, D], new key/value [1, H_kv, N, D] -> [1, N, H, D]."""
        _, heads, total, dim = query.shape
        q = query[0].view(self.kv_heads, self.groups_per_kv_head, total, dim)
        self._write_new_positions(layer, key[0], value[0], plan)
        if not plan.depth:  # no shared runs: each row's own buffer is all there is
            out = query.new_empty((self.kv_heads, self.groups_per_kv_head, total, dim))
            for row, (a, b), mask in zip(plan.rows, plan.spans, plan.masks, strict=True):
                out[:, :, a:b] = self._kernel(q[:, :, a:b], *row.buffer.filled(layer, b - a), mask)[0]
            return out.reshape(heads, total, dim).transpose(0, 1).unsqueeze(0)
        outs, lses = plan.outs, plan.lses
        assert outs is not None and lses is not None
        for group in plan.groups:  # each shared run once, for every row that reads it
            keys, values = group.run.keys[layer], group.run.values[layer]
            if group.index is None:
                a, b = group.spans[0]
                outs[group.depth, :, :, a:b], lses[group.depth, :, :, a:b] = self._kernel(q[:, :, a:b], keys, values)
            else:
                o, lse = self._kernel(q.index_select(2, group.index), keys, values)
                outs[group.depth].index_copy_(2, group.index, o)
                lses[group.depth].index_copy_(2, group.index, lse)
        for row, (a, b), mask in zip(plan.rows, plan.spans, plan.masks, strict=True):
            outs[-1, :, :, a:b], lses[-1, :, :, a:b] = self._kernel(q[:, :, a:b], *row.buffer.filled(layer, b - a), mask)
        weights = torch.softmax(lses, dim=0).unsqueeze(-1).to(outs.dtype)  # each segment's share of the softmax
        out = (outs * weights).sum(dim=0)
        return out.reshape(heads, total, dim).transpose(0, 1).unsqueeze(0)

    def _write_new_positions(self, layer: int, key: torch.Tensor, value: torch.Tensor, plan: _Plan) -> None:
        """The new positions' K/V go to each row's buffer (one batched copy for all rows)."""
        targets, sources = [], []
        for row, (a, b) in zip(plan.rows, plan.spans, strict=True):
            held = row.buffer.num_tokens
            targets += [row.buffer.keys[layer][:, held : held + b - a], row.buffer.values[layer][:, held : held + b - a]]
            sources += [key[:, a:b], value[:, a:b]]
        torch._foreach_copy_(targets, sources)

    def _kernel(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q [H_kv, G, n, D] over k/v [H_kv, T, D]: output [H_kv, G, n, D] and the
        log-sum-exp of the scores [H_kv, G, n]. The G query heads of one KV head are folded into
        the query axis, so grouped K/V are read as they are, never repeated."""
        kv_heads, groups, n, dim = q.shape
        folded = q.reshape(1, kv_heads, groups * n, dim)
        scale = dim**-0.5
        if self.use_flash_cpu:
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                folded, k.unsqueeze(0), v.unsqueeze(0), 0.0, False, attn_mask=mask, scale=scale
            )
        else:
            o, lse = _attention_with_lse(folded, k.unsqueeze(0), v.unsqueeze(0), mask, scale)
        return o.view(kv_heads, groups, n, dim), lse.view(kv_heads, groups, n)


def _attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention that also returns the log-sum-exp (any device), in float32."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return torch.matmul(probs, v.float()).to(q.dtype), lse


_NO_MASK = torch.zeros(1, 1, 1, 1)
_SDPA = "sdpa"


def _install_attention() -> None:
    """Put our attention in front of transformers' SDPA: calls that carry a plan are ours; every
    other call goes to SDPA unchanged (generate, the bench's baselines, continuous batching)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    original = ALL_ATTENTION_FUNCTIONS[_SDPA]
    if getattr(original, "kvchat_wrapper", False):
        return

    def attention(module, query, key, value, attention_mask, *args, **kwargs):  # type: ignore[no-untyped-def]
        plan = kwargs.get("kvchat_plan")
        if plan is None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        return kwargs["kvchat_forward"].attend(module.layer_idx, query, key, value, plan), None

    attention.kvchat_wrapper = True  # type: ignore[attr-defined]
    AttentionInterface.register(_SDPA, attention)
