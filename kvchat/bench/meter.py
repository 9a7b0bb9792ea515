"""What the bench measures at the model itself, trusting none of kvchat's own bookkeeping.

`ModelMeter` hooks the model's forward: before each call it notes how many positions the cache
already held and which ids are fed; after each call it sums the bytes of every tensor reachable
from the engine and from the cache being written, deduplicated by storage. So reuse is counted as
the prompt positions that never went through `forward`, and bytes are sampled while requests run,
at every prefill and decode step, running requests included. A sample takes milliseconds on a
full store and runs inside kvchat's timed prefill and decode, so the meter times itself and
`Measured.sample_s` says how much to take back out of kvchat's TTFT and decode time.
"""

from __future__ import annotations

import time
import types
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(slots=True)
class Call:
    past_tokens: int  # positions the cache held before this forward
    token_ids: list[int]  # ids fed, in position order from `past_tokens`
    sample_s: float = 0.0  # the meter's own time spent sampling bytes after this forward


@dataclass(slots=True)
class Measured:
    """One request as the model saw it."""

    calls: list[Call] = field(default_factory=list)
    max_held_bytes: int = 0  # largest sample taken during the request
    samples: int = 0
    violations: int = 0  # samples over the budget

    def cached_tokens(self, prompt_ids: list[int]) -> int:
        """Prompt positions that never went through forward in this request."""
        fed = set()
        for call in self.calls:
            fed.update(range(call.past_tokens, min(len(prompt_ids), call.past_tokens + len(call.token_ids))))
        return len(prompt_ids) - len(fed)

    def sample_s(self, prompt_tokens: int) -> tuple[float, float]:
        """Seconds the meter spent after prefill forwards (inside kvchat's TTFT) and after decode
        forwards (inside its decode time)."""
        prefill = sum(call.sample_s for call in self.calls if call.past_tokens < prompt_tokens)
        decode = sum(call.sample_s for call in self.calls if call.past_tokens >= prompt_tokens)
        return prefill, decode

    def wrong_ids(self, prompt_ids: list[int]) -> int:
        """Fed prompt positions whose id differs from the prompt's (a bug if ever > 0)."""
        return sum(
            1
            for call in self.calls
            for offset, token in enumerate(call.token_ids)
            if call.past_tokens + offset < len(prompt_ids) and prompt_ids[call.past_tokens + offset] != token
        )

    def fed_sequence(self, prompt_ids: list[int]) -> list[int]:
        """The prompt followed by every reply token that was fed back (what an ideal cache holds)."""
        reply = {}
        for call in self.calls:
            for offset, token in enumerate(call.token_ids):
                if call.past_tokens + offset >= len(prompt_ids):
                    reply[call.past_tokens + offset] = token
        return prompt_ids + [reply[p] for p in sorted(reply)]


_SCALARS = frozenset({int, float, bool, complex, str, bytes, type(None)})
# Objects whose insides are not KV: the weights and the tokenizer are big and never cached data.
_OPAQUE = (torch.nn.Module, PreTrainedTokenizerBase, type, types.ModuleType, *_SCALARS)


def reachable_tensor_bytes(*roots: Any) -> int:
    """Bytes of every tensor storage reachable from `roots` (modules and tokenizers not entered),
    each storage counted once however many views share it."""
    storages: dict[int, int] = {}
    for tensor in _tensors(roots):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _tensors(roots: tuple[Any, ...]) -> Iterator[torch.Tensor]:
    seen: set[int] = set()
    todo = deque(roots)
    while todo:
        obj = todo.pop()
        if isinstance(obj, _OPAQUE) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset, deque)):
            if not all(map(_SCALARS.__contains__, map(type, obj))):  # token ids: skipped at C speed
                todo.extend(obj)
        else:
            todo.extend(_attributes(obj))


def _attributes(obj: Any) -> list[Any]:
    found = []
    if isinstance(obj, types.MethodType):
        found.append(obj.__self__)
    if isinstance(obj, types.FunctionType) and obj.__closure__:
        found.extend(cell.cell_contents for cell in obj.__closure__ if _filled(cell))
    if hasattr(obj, "__dict__") and isinstance(vars(obj), dict):
        found.append(vars(obj))
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                found.append(getattr(obj, name))
    return found


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


class ModelMeter:
    """Counts, at the model's forward, what one engine's requests feed and hold.

    Use `begin()` before a request and `end()` after it; calls outside a request are not recorded
    (other systems share the model) but bytes are still checked against the budget.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._roots: tuple[Any, ...] = ()
        self._budget_bytes = 0
        self._current: Measured | None = None
        self.samples = 0
        self.violations = 0
        self.max_held_bytes = 0
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True),
        ]

    def begin(self, engine: Any) -> None:
        """Start recording a request served by `engine`; its budget is what samples are held to."""
        self._roots, self._budget_bytes = (engine,), engine.stats().budget_bytes
        self._current = Measured()

    def end(self) -> Measured:
        """Stop recording; a last sample is taken with nothing running (after the store's check-in)."""
        assert self._current is not None, "end() without begin()"
        self._sample(())
        measured, self._current, self._roots = self._current, None, ()
        return measured

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._current is None:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        positions = kwargs.get("position_ids")
        if positions is not None:  # the positions the model is told the ids sit at (RoPE uses them)
            past = int(positions[0, 0])
        else:
            cache = _cache_of(kwargs)
            past = cache.get_seq_length() if cache is not None else 0
        self._current.calls.append(Call(past, input_ids[0].tolist()))

    def _after(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._current is not None:
            started = time.perf_counter()
            self._sample((_cache_of(kwargs),))
            self._current.calls[-1].sample_s = time.perf_counter() - started

    def _sample(self, running: tuple[Any, ...]) -> None:
        held = reachable_tensor_bytes(*self._roots, *running)
        self.samples += 1
        self.max_held_bytes = max(self.max_held_bytes, held)
        over = held > self._budget_bytes
        self.violations += over
        if self._current is not None:
            self._current.samples += 1
            self._current.max_held_bytes = max(self._current.max_held_bytes, held)
            self._current.violations += over


def _cache_of(kwargs: dict) -> Any:
    return kwargs.get("cache", kwargs.get("past_key_values"))
