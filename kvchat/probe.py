"""Verified at load: which attention path serves this model exactly, or why none does.

Before serving, each path (`attention.py`: cascade first, then compatible) runs a short synthetic
case shaped like serving: a shared run prefilled in two chunks, two rows of different lengths
reading it by reference and one reading a copy of it, all in one forward, then a decode step for
all three. Every logit vector it returns is compared with the model's own full forward over the
same tokens (no cache, nothing of ours). The rows' tails are prefixes of one another, so one full
forward is the reference for all of them (attention is causal): 7 forwards in all. The error is
relative (||path - full|| / ||full|| over the vocabulary): rounding spreads thin, a wrong path
moves every logit. The tolerance is learnt from the model itself: how far its own incremental
forward through a stock cache (as `generate` runs) lands from its full forward, rounding at this
dtype and device, times `NOISE_FACTOR`, and at least a few rounding units of the dtype. A path
above it is not served.

In 16-bit dtypes that rounding is large (on the bundled model in bfloat16 the model's own
incremental forward lands 0.9% from its full forward, and a cascade with its scale 5% off 2.6%),
so a small logic error could hide in it. The path is then also checked in float32 on a CPU twin of
the model (weights up to `TWIN_MAX_BYTES`): the logic is the same in every dtype, and float32 tells
it apart (the same 5% error: 2.9% against 8e-7).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from kvchat.errors import InputError
from kvchat.kv.attention import NativeForward, Row, SegmentedForward, Unsupported, kv_layout
from kvchat.kv.runs import KVRun, RowBuffer

if TYPE_CHECKING:
    from kvchat.models import LoadedModel

log = logging.getLogger(__name__)

PATHS = ("cascade", "compatible")
NOISE_FACTOR = 4.0  # a path may differ from the full forward by this many times the model's own rounding
FLOOR = 1e-5  # the least tolerance (relative error) in any dtype
FLOOR_ROUNDING_UNITS = 4  # and at least this many rounding units of the dtype (bf16: 3e-2, fp16: 4e-3)
SHARED_CHUNKS = (10, 6)  # the shared run, prefilled in two chunks
TAILS = (7, 3, 5)  # prompt tokens after the shared run; rows 1-2 read it by reference, row 3 a copy
DECODE_TOKENS = 1
TWIN_MAX_BYTES = 2**30  # a 16-bit model up to this size is also checked as a float32 copy on the CPU

Forward = SegmentedForward | NativeForward


@dataclass(frozen=True, slots=True)
class PathCheck:
    """One path's result on the probe."""

    path: str  # "cascade" or "compatible"
    dtype: str  # what it ran in: the loaded dtype, or float32 on the CPU twin of a 16-bit model
    error: float | None  # largest relative difference of a logit vector from the full forward; None: it raised
    tolerance: float
    failure: str = ""  # why it raised

    @property
    def exact(self) -> bool:
        return self.error is not None and self.error <= self.tolerance

    def describe(self) -> str:
        if self.error is None:
            return f"{self.path} ({self.dtype}): {self.failure}"
        verdict = "within" if self.exact else "above"
        return (f"{self.path} ({self.dtype}): logits differ by {self.error:.1e} (relative), {verdict} "
                f"the tolerance {self.tolerance:.1e}")


@dataclass(frozen=True, slots=True)
class AttentionChoice:
    """The path a model is served on, and why."""

    path: str  # "cascade" or "compatible"
    family: str  # the model's `model_type`
    checks: list[PathCheck] = field(default_factory=list)
    probe_ms: float = 0.0

    @property
    def reason(self) -> str:
        """Why the cascade path is not used ("" when it is)."""
        failed = [c for c in self.checks if c.path == "cascade" and not c.exact]
        return "" if self.path == "cascade" else "; ".join(c.describe() for c in failed)

    def summary(self) -> str:
        if self.path == "cascade":
            return "cascade (shared runs read in place, verified at load)"
        why = f": {self.reason}" if self.reason else ""
        return f"compatible (the model's own attention over copied KV, verified at load){why}"


def choose(
    model: PreTrainedModel, device: torch.device, wanted: str = "auto", float_rounding: float | None = None
) -> tuple[Forward, AttentionChoice]:
    """The first path (cascade, then compatible; or only `wanted`) whose logits match the model's
    own forward. `float_rounding`, for a quantised model, is `rounding(...)` of its float weights:
    the tolerance is then learnt from them, so rounding that quantisation adds counts as a
    difference. Raises InputError naming the family and what differed when none does."""
    if wanted not in ("auto", *PATHS):
        raise InputError(f"unknown attention path {wanted!r}: use auto, cascade or compatible")
    started = time.perf_counter()
    family = str(getattr(model.config, "model_type", type(model).__name__))
    candidates = PATHS if wanted == "auto" else (wanted,)
    checks: list[PathCheck] = []
    with torch.inference_mode():
        case = _Case.make(model, device, float_rounding)
        twin = _float32_twin(model)
        twin_case = _Case.make(twin, torch.device("cpu")) if twin is not None else None
        for path in candidates:
            forward = _new_forward(path, model, device)
            checks.append(case.check(path, forward))
            if checks[-1].exact and twin_case is not None:
                checks.append(twin_case.check(path, _new_forward(path, twin_case.model, twin_case.device)))
            if checks[-1].exact:
                choice = AttentionChoice(path, family, checks, (time.perf_counter() - started) * 1000)
                log.info("attention path for %s: %s (probe %.0f ms)", family, choice.summary(), choice.probe_ms)
                return forward, choice
    details = "; ".join(check.describe() for check in checks)
    raise InputError(f"kvchat cannot serve this {family} model exactly, so it does not serve it ({details})")


def _float32_twin(model: PreTrainedModel) -> PreTrainedModel | None:
    """A float32 copy on the CPU of a 16-bit model small enough to copy; None otherwise."""
    if model.dtype not in (torch.bfloat16, torch.float16):
        return None
    nbytes = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    if nbytes > TWIN_MAX_BYTES:
        log.warning("probe: %d bytes of weights are too many for a float32 twin; checked in %s only",
                    nbytes, model.dtype)  # fmt: skip
        return None
    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32)


def _new_forward(path: str, model: PreTrainedModel, device: torch.device) -> Forward:
    return SegmentedForward(model, device) if path == "cascade" else NativeForward(model, device)


@dataclass(slots=True)
class _Case:
    model: PreTrainedModel
    device: torch.device
    shared: list[int]
    tails: list[list[int]]  # each row's prompt after the shared run, then its decode token
    reference: torch.Tensor  # the full forward's logits at every position of the longest row [T, vocab]
    tolerance: float

    @classmethod
    def make(cls, model: PreTrainedModel, device: torch.device, noise: float | None = None) -> _Case:
        """The case for `model`; its tolerance from `noise` when given, else from the model's own rounding."""
        shared, tails = _tokens(model)
        reference = _full_logits(model, device, shared + max(tails, key=len))
        if noise is None:
            noise = _stock_cache_diff(model, device, shared, tails[0], reference)
        # the model's own noise can be 0 at these shapes while a batched or chunked one rounds
        floor = max(FLOOR, FLOOR_ROUNDING_UNITS * torch.finfo(model.dtype).eps)
        return cls(model, device, shared, tails, reference, max(NOISE_FACTOR * noise, floor))

    def check(self, path: str, forward: Forward) -> PathCheck:
        try:
            diff = self._run(forward)
        except (Unsupported, RuntimeError, TypeError, ValueError, IndexError) as err:
            return PathCheck(path, self.dtype, None, self.tolerance, f"{type(err).__name__}: {err}")
        if diff != diff:  # NaN
            return PathCheck(path, self.dtype, None, self.tolerance, "logits are NaN")
        return PathCheck(path, self.dtype, diff, self.tolerance)

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    def _run(self, forward: Forward) -> float:
        """The serving shapes through `forward`; the largest |difference| from the reference."""
        model, device, dtype = self.model, self.device, self.model.dtype
        worst = 0.0

        def compare(logits: torch.Tensor, position: int) -> None:
            nonlocal worst
            worst = max(worst, _relative_error(logits, self.reference[position]))

        shared = RowBuffer(kv_layout(model), len(self.shared), device, dtype)
        start = 0
        for size in SHARED_CHUNKS:  # chunked prefill of the shared run
            logits = forward([Row([], shared, self.shared[start : start + size])])
            start += size
            compare(logits[0], start - 1)
        run = KVRun(shared.keys, shared.values)
        rows = []
        for index, tail in enumerate(self.tails):
            buffer = RowBuffer(kv_layout(model), len(self.shared) + len(tail), device, dtype)
            by_reference = index < len(self.tails) - 1
            if not by_reference:
                buffer.append_run(run, run.num_tokens)
            rows.append(Row([run] if by_reference else [], buffer, tail[: -DECODE_TOKENS]))
        for step in range(DECODE_TOKENS + 1):  # the prompts together, then decode steps together
            logits = forward(rows)
            for index, (row, tail) in enumerate(zip(rows, self.tails, strict=True)):
                fed = len(tail) - DECODE_TOKENS + step
                compare(logits[index], len(self.shared) + fed - 1)
                row.token_ids = tail[fed : fed + 1]
        return worst


def rounding(model: PreTrainedModel, device: torch.device) -> float:
    """How far the model's own incremental forward lands from its full forward on the probe's
    case (relative error of the logits): its rounding at this dtype and device."""
    with torch.inference_mode():
        shared, tails = _tokens(model)
        reference = _full_logits(model, device, shared + max(tails, key=len))
        return _stock_cache_diff(model, device, shared, tails[0], reference)


def _tokens(model: PreTrainedModel) -> tuple[list[int], list[list[int]]]:
    """The case's token ids, drawn with a fixed seed: the shared run, and each row's tail (its
    prompt after the shared run, then its decode token; each a prefix of the last)."""
    output = model.get_output_embeddings()
    vocab = getattr(output, "out_features", None) or model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(0, vocab, (n,), generator=generator).tolist()  # noqa: E731
    shared = draw(sum(SHARED_CHUNKS))
    longest = draw(max(TAILS) + DECODE_TOKENS)
    return shared, [longest[: n + DECODE_TOKENS] for n in TAILS]


def _full_logits(model: PreTrainedModel, device: torch.device, ids: list[int]) -> torch.Tensor:
    """The model's own forward over the whole sequence, no cache: logits [T, vocab]."""
    return model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0]


def _stock_cache_diff(
    model: PreTrainedModel, device: torch.device, shared: list[int], tail: list[int], reference: torch.Tensor
) -> float:
    """How far the model's own incremental forward (as `generate` runs it: a stock cache, the
    prompt, then one token at a time) lands from its full forward."""
    cache = DynamicCache(config=model.config)
    pieces = [shared + tail[: -DECODE_TOKENS], *([t] for t in tail[-DECODE_TOKENS:])]
    worst, end = 0.0, 0
    for piece in pieces:
        end += len(piece)
        out = model(
            input_ids=torch.tensor([piece], device=device),
            attention_mask=torch.ones((1, end), dtype=torch.long, device=device),
            cache=cache, use_cache=True,
        )  # fmt: skip
        worst = max(worst, _relative_error(out.logits[0, -1], reference[end - 1]))
    return worst


def _relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """||logits - reference|| / ||reference|| over the vocabulary (float32). Rounding spreads
    thin over the vocabulary; a wrong path moves every logit, so the norm tells them apart where
    the largest single difference (16-bit rounding of the largest logit) cannot."""
    reference = reference.float()
    return float((logits.float() - reference).norm() / reference.norm().clamp_min(1e-30))


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


def choose_for(loaded: LoadedModel, attention: str) -> tuple[Forward, AttentionChoice]:
    """The probe's path for this model; a quantised one is held to its float model's rounding,
    and a refusal says so."""
    report = loaded.quantization
    if report is None:
        return choose(loaded.model, loaded.device, attention)
    try:
        return choose(loaded.model, loaded.device, attention, float_rounding=report.float_rounding)
    except InputError as err:
        raise InputError(
            f"--quantize {report.mode} changes what reuse computes: {err}. The tolerance is the float model's own "
            f"rounding, and {report.mode} linears move a prompt's logits further when it is fed in chunks or "
            f"read from the cache than float32 does, so a cached reply could differ from a recomputed one"
            + ("; --quantize fp16 keeps activations in float32 and is served exactly" if report.mode == "int8" else "")
        ) from err
