"""How one forward reads the engine's KV: two paths, chosen at load by `probe.py`.

- `SegmentedForward` (the cascade path): one model forward over many requests at once. Their
  tokens are laid end to end in one sequence; each request attends to its shared runs and then its
  own buffer. Attention is computed per segment with the log-sum-exp of each, then merged (cascade
  attention, as in FlashInfer's cascade kernels): a run shared by several requests is read once for
  all of them, and no prefix is ever copied. It is registered in place of transformers' "sdpa"
  attention and falls back to it for every call that is not ours, so `generate` and other users of
  the same model are untouched. It honours what a model hands its attention function (`scaling`,
  `softcap`) and refuses, with the reason, what it does not implement (sliding windows, sinks,
  a model whose attention does not go through transformers' attention interface).
- `NativeForward` (the compatible path): each request through the model's own forward, with its
  own attention, masks (sliding windows, ALiBi) and position handling, over a cache that is a view
  of the request's buffer. Runs are copied into the buffer at admission, so reuse per session and
  per shared system prompt still holds; what is lost is reading a shared run once for many rows.

Both take the same `Row`s and return the same logits; the scheduler asks `reads_runs_in_place`.

This is the one module that reaches into transformers' attention and cache internals; it also
reads a model's KV layout from a real forward (`kv_layout`).
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from kvchat.kv.runs import KVRun, RowBuffer


class Unsupported(RuntimeError):
    """The cascade path cannot reproduce what this model's attention does (the message says what)."""


@dataclass(slots=True)
class Row:
    """One request's part of a forward: its shared runs (root first), its buffer, the ids fed now."""

    runs: list[KVRun]
    buffer: RowBuffer
    token_ids: list[int]

    @property
    def start_position(self) -> int:
        return sum(run.num_tokens for run in self.runs) + self.buffer.num_tokens

    def check_room(self) -> None:
        """RuntimeError when the buffer cannot take `token_ids`: its request reserved too little."""
        if self.buffer.num_tokens + len(self.token_ids) > self.buffer.capacity_tokens:
            raise RuntimeError("a row's buffer is full: its request reserved too little")


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
    depth: int  # most runs any row reads (partial results per query: depth + 1)
    total: int  # tokens fed, all rows together
    masks: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)  # per query-head group size
    # (H_kv, G, D) -> [depth + 1, H_kv, G, N, D] partial outputs and [depth + 1, H_kv, G, N] their
    # log-sum-exps (-inf where no segment), both float32 so a 16-bit model is rounded once, after
    # the merge, as SDPA rounds once: every layer of one shape writes the same positions
    partials: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    layers_seen: int = 0  # attention calls that reached us in this forward


class SegmentedForward:
    """The cascade path; see the module docstring."""

    reads_runs_in_place = True

    def __init__(self, model: PreTrainedModel, device: torch.device) -> None:
        _install_attention()
        self.model = model
        self.device = device
        self.num_layers = len(kv_layout(model))
        self.use_flash_cpu = device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")

    def __call__(self, rows: list[Row]) -> torch.Tensor:
        """Feed each row's `token_ids` after what it holds; returns each row's last logits [rows, vocab].

        Raises `Unsupported` when the model's attention asked for something this path does not
        implement, or never reached it."""
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
        if plan.layers_seen != self.num_layers:
            raise Unsupported(
                f"{plan.layers_seen} of {self.num_layers} layers called transformers' sdpa attention "
                f"(this model computes attention its own way, or in eager mode)"
            )
        for row in rows:
            row.buffer.num_tokens += len(row.token_ids)
        return out.logits[0]

    def _plan(self, rows: list[Row]) -> _Plan:
        spans, groups = [], {}
        start = 0
        for row in rows:
            n = len(row.token_ids)
            if n == 0:
                raise ValueError("every row must feed at least one token")
            row.check_room()
            span = (start, start + n)
            spans.append(span)
            for depth, run in enumerate(row.runs):
                group = groups.setdefault(id(run), _Group(run, depth, []))
                group.spans.append(span)
            start += n
        for group in groups.values():
            if len(group.spans) > 1:
                group.index = torch.cat([torch.arange(a, b) for a, b in group.spans]).to(self.device)
        depth = max((len(row.runs) for row in rows), default=0)
        return _Plan(rows, spans, list(groups.values()), depth, start)

    def _masks(self, plan: _Plan, groups: int, dtype: torch.dtype) -> list[torch.Tensor | None]:
        """Per row, a causal mask over its buffer when it feeds more than one token (made once per
        forward for each query-head group size)."""
        if groups not in plan.masks:
            plan.masks[groups] = [
                self._causal_mask(row.buffer.num_tokens, b - a, groups, dtype) if b - a > 1 else None
                for row, (a, b) in zip(plan.rows, plan.spans, strict=True)
            ]
        return plan.masks[groups]

    def _causal_mask(self, held: int, n: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [1, 1, G*n, held+n]: new token i sees the buffer up to its own position."""
        allowed = torch.arange(held + n, device=self.device)[None, :] <= held + torch.arange(n, device=self.device)[:, None]
        mask = torch.zeros(allowed.shape, device=self.device, dtype=dtype).masked_fill(~allowed, float("-inf"))
        return mask.repeat(groups, 1)[None, None]

    def _partials(self, plan: _Plan, kv_heads: int, groups: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (kv_heads, groups, dim)
        if key not in plan.partials:
            shape = (plan.depth + 1, kv_heads, groups, plan.total)
            plan.partials[key] = (
                torch.zeros((*shape, dim), device=self.device, dtype=torch.float32),
                torch.full(shape, float("-inf"), device=self.device, dtype=torch.float32),
            )
        return plan.partials[key]

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: _Plan, options: dict[str, Any]
    ) -> torch.Tensor:
        """Attention for one layer: query [1, H, N, D], new key/value [1, H_kv, N, D] -> [1, N, H, D].
        `options` are what the model handed its attention function."""
        plan.layers_seen += 1
        scaling, softcap = _check_options(options, query.shape[-1])
        _, heads, total, dim = query.shape
        kv_heads = key.shape[1]
        groups = heads // kv_heads
        q = query[0].view(kv_heads, groups, total, dim)
        self._write_new_positions(layer, key[0], value[0], plan)
        masks = self._masks(plan, groups, query.dtype)

        def kernel(q_part: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
            return self._kernel(q_part, k, v, mask, scaling, softcap)

        if not plan.depth:  # no shared runs: each row's own buffer is all there is
            out = query.new_empty((kv_heads, groups, total, dim))
            for row, (a, b), mask in zip(plan.rows, plan.spans, masks, strict=True):
                out[:, :, a:b] = kernel(q[:, :, a:b], *row.buffer.filled(layer, b - a), mask)[0]
            return out.reshape(heads, total, dim).transpose(0, 1).unsqueeze(0)
        outs, lses = self._partials(plan, kv_heads, groups, dim)
        for group in plan.groups:  # each shared run once, for every row that reads it
            keys, values = group.run.keys[layer], group.run.values[layer]
            if group.index is None:
                a, b = group.spans[0]
                outs[group.depth, :, :, a:b], lses[group.depth, :, :, a:b] = kernel(q[:, :, a:b], keys, values)
            else:
                o, lse = kernel(q.index_select(2, group.index), keys, values)
                outs[group.depth].index_copy_(2, group.index, o.float())
                lses[group.depth].index_copy_(2, group.index, lse)
        for row, (a, b), mask in zip(plan.rows, plan.spans, masks, strict=True):
            outs[-1, :, :, a:b], lses[-1, :, :, a:b] = kernel(q[:, :, a:b], *row.buffer.filled(layer, b - a), mask)
        weights = torch.softmax(lses, dim=0).unsqueeze(-1)  # each segment's share of the softmax
        out = (outs * weights).sum(dim=0).to(query.dtype)
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
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
        scale: float, softcap: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q [H_kv, G, n, D] over k/v [H_kv, T, D]: output [H_kv, G, n, D] and the
        log-sum-exp of the scores [H_kv, G, n]. The G query heads of one KV head are folded into
        the query axis, so grouped K/V are read as they are, never repeated."""
        kv_heads, groups, n, dim = q.shape
        folded = q.reshape(1, kv_heads, groups * n, dim)
        if self.use_flash_cpu and softcap is None:
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                folded, k.unsqueeze(0), v.unsqueeze(0), 0.0, False, attn_mask=mask, scale=scale
            )
        else:
            o, lse = _attention_with_lse(folded, k.unsqueeze(0), v.unsqueeze(0), mask, scale, softcap)
        return o.view(kv_heads, groups, n, v.shape[-1]), lse.view(kv_heads, groups, n)


_REFUSED = {  # what the model may hand its attention that the cascade does not implement
    "sliding_window": "sliding-window layers",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "position_bias": "a position bias added to the scores",
}


def _check_options(options: dict[str, Any], dim: int) -> tuple[float, float | None]:
    """(scale, softcap) from what the model handed its attention; `Unsupported` for the rest."""
    for name, what in _REFUSED.items():
        if options.get(name) is not None:
            raise Unsupported(f"the model's attention uses {what} ({name}={options[name]!r})")
    if options.get("dropout"):
        raise Unsupported(f"attention dropout {options['dropout']} (the model is in training mode)")
    scaling = options.get("scaling")
    return (dim**-0.5 if scaling is None else float(scaling)), options.get("softcap")


def _attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention that also returns the log-sum-exp (any device), in float32. `softcap`
    bounds the scores as Gemma 2 does: softcap * tanh(scores / softcap), before the mask."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
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
        return kwargs["kvchat_forward"].attend(module.layer_idx, query, key, value, plan, kwargs), None

    attention.kvchat_wrapper = True  # type: ignore[attr-defined]
    AttentionInterface.register(_SDPA, attention)


class NativeForward:
    """The compatible path; see the module docstring. Rows run one after another, each as the
    model runs alone in `generate`: its own masks, positions and attention, over its buffer."""

    reads_runs_in_place = False

    def __init__(self, model: PreTrainedModel, device: torch.device) -> None:
        self.model = model
        self.device = device
        accepted = inspect.signature(model.forward).parameters
        self.takes_position_ids = "position_ids" in accepted
        self.takes_logits_to_keep = "logits_to_keep" in accepted

    def __call__(self, rows: list[Row]) -> torch.Tensor:
        """Feed each row's `token_ids` after what it holds; returns each row's last logits [rows, vocab]."""
        return torch.stack([self._forward(row) for row in rows])

    def _forward(self, row: Row) -> torch.Tensor:
        n, past = len(row.token_ids), row.start_position
        row.check_room()
        cache = DynamicCache(config=self.model.config)
        cache.layers = [_RowLayer(row, layer) for layer in range(len(row.buffer.keys))]
        inputs: dict[str, Any] = {
            "input_ids": torch.tensor([row.token_ids], device=self.device),
            "attention_mask": torch.ones((1, past + n), dtype=torch.long, device=self.device),
            "cache": cache,
            "use_cache": True,
        }
        if self.takes_position_ids:
            inputs["position_ids"] = torch.arange(past, past + n, device=self.device)[None]
        if self.takes_logits_to_keep:
            inputs["logits_to_keep"] = 1
        logits = self.model(**inputs).logits[0, -1]
        row.buffer.num_tokens += n
        return logits


class _RowLayer(DynamicLayer):
    """A cache layer over one row: its runs (concatenated once, for the rare row that reads runs by
    reference here: a system prompt computed after a shorter shared one) and its buffer, written in
    place. Keys and values are views [1, H_kv, T, D]; only what the row holds is exposed."""

    def __init__(self, row: Row, layer: int) -> None:
        super().__init__()
        self.buffer, self.layer = row.buffer, layer
        self.prefix = None
        if row.runs:
            self.prefix = (
                torch.cat([run.keys[layer] for run in row.runs], dim=1),
                torch.cat([run.values[layer] for run in row.runs], dim=1),
            )
        self.is_initialized = True
        self.device = self.buffer.keys[layer].device
        self._expose(self.buffer.num_tokens)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        held, n = self.buffer.num_tokens, key_states.shape[-2]
        self.buffer.keys[self.layer][:, held : held + n].copy_(key_states[0])
        self.buffer.values[self.layer][:, held : held + n].copy_(value_states[0])
        self._expose(held + n)
        return self.keys, self.values

    def _expose(self, end: int) -> None:
        keys, values = self.buffer.keys[self.layer][:, :end], self.buffer.values[self.layer][:, :end]
        if self.prefix is not None:
            keys, values = torch.cat([self.prefix[0], keys], dim=1), torch.cat([self.prefix[1], values], dim=1)
        self.keys, self.values = keys.unsqueeze(0), values.unsqueeze(0)



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
