"""Verified at load: which attention path serves this model exactly, or why none does.

Before serving, each path (`attention.py`: cascade first, then compatible) runs a short synthetic
case shaped like serving: a shared run prefilled in two chunks, two rows of different lengths
reading it by reference and one reading a copy of it, all in one forward, then a decode step for
all three. Every logit it returns is compared with the model's own full forward over the same
tokens (no cache, nothing of ours). The tolerance is learnt from the model itself: how far its own
chunked forward through a stock cache lands from its full forward (rounding at this dtype and
device), times `NOISE_FACTOR`, with a floor per dtype. A path above it is not served.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from kvchat.attention import NativeForward, Row, SegmentedForward, Unsupported
from kvchat.errors import InputError
from kvchat.kv_storage import KVRun, RowBuffer

log = logging.getLogger(__name__)

PATHS = ("cascade", "compatible")
NOISE_FACTOR = 4.0  # a path may differ from the full forward by this many times the model's own rounding
FLOOR = {torch.float32: 1e-4, torch.float64: 1e-8}  # relative to the largest logit; 16-bit dtypes: 2e-2
SHARED_CHUNKS = (24, 16)  # the shared run, prefilled in two chunks
TAILS = (19, 6, 11)  # rows: two read the run by reference, the last reads a copy of it
DECODE_TOKENS = 1

Forward = SegmentedForward | NativeForward


@dataclass(frozen=True, slots=True)
class PathCheck:
    """One path's result on the probe."""

    path: str  # "cascade" or "compatible"
    max_abs_diff: float | None  # largest |logit difference| from the full forward; None: it raised
    tolerance: float
    error: str = ""  # why it raised

    @property
    def exact(self) -> bool:
        return self.max_abs_diff is not None and self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        if self.max_abs_diff is None:
            return f"{self.path}: {self.error}"
        verdict = "within" if self.exact else "above"
        return f"{self.path}: logits differ by {self.max_abs_diff:.2e}, {verdict} the tolerance {self.tolerance:.2e}"


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
        cascade = next((c for c in self.checks if c.path == "cascade"), None)
        if self.path == "cascade" or cascade is None:
            return ""
        return cascade.describe()

    def summary(self) -> str:
        if self.path == "cascade":
            return "cascade (shared runs read in place, verified at load)"
        why = f": {self.reason}" if self.reason else ""
        return f"compatible (the model's own attention over copied KV, verified at load){why}"


def choose(model: PreTrainedModel, device: torch.device, wanted: str = "auto") -> tuple[Forward, AttentionChoice]:
    """The first path (cascade, then compatible; or only `wanted`) whose logits match the model's
    own forward. Raises InputError naming the family and what differed when none does."""
    if wanted not in ("auto", *PATHS):
        raise InputError(f"unknown attention path {wanted!r}: use auto, cascade or compatible")
    started = time.perf_counter()
    family = str(getattr(model.config, "model_type", type(model).__name__))
    candidates = PATHS if wanted == "auto" else (wanted,)
    checks: list[PathCheck] = []
    with torch.inference_mode():
        case = _Case.make(model, device)
        for path in candidates:
            forward = _new_forward(path, model, device)
            check = case.check(path, forward)
            checks.append(check)
            if check.exact:
                choice = AttentionChoice(path, family, checks, (time.perf_counter() - started) * 1000)
                log.info("attention path for %s: %s (probe %.0f ms)", family, choice.summary(), choice.probe_ms)
                return forward, choice
    details = "; ".join(check.describe() for check in checks)
    raise InputError(f"kvchat cannot serve this {family} model exactly, so it does not serve it ({details})")


def _new_forward(path: str, model: PreTrainedModel, device: torch.device) -> Forward:
    return SegmentedForward(model, device) if path == "cascade" else NativeForward(model, device)


@dataclass(slots=True)
class _Case:
    model: PreTrainedModel
    device: torch.device
    shared: list[int]
    tails: list[list[int]]  # each row's prompt after the shared run, then its decode token
    reference: list[torch.Tensor]  # per row, the full forward's logits at every position [T, vocab]
    tolerance: float

    @classmethod
    def make(cls, model: PreTrainedModel, device: torch.device) -> _Case:
        vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None \
            else model.config.vocab_size
        generator = torch.Generator().manual_seed(0)
        draw = lambda n: torch.randint(0, vocab, (n,), generator=generator).tolist()  # noqa: E731
        shared = draw(sum(SHARED_CHUNKS))
        tails = [draw(n + DECODE_TOKENS) for n in TAILS]
        reference = [_full_logits(model, device, shared + tail) for tail in tails]
        noise = max(_stock_cache_diff(model, device, shared, tail, ref) for tail, ref in zip(tails, reference))
        scale = max(1.0, max(float(ref.abs().max()) for ref in reference))
        floor = FLOOR.get(model.dtype, 2e-2) * scale
        return cls(model, device, shared, tails, reference, max(NOISE_FACTOR * noise, floor))

    def check(self, path: str, forward: Forward) -> PathCheck:
        try:
            diff = self._run(forward)
        except (Unsupported, RuntimeError, TypeError, ValueError, IndexError) as err:
            return PathCheck(path, None, self.tolerance, f"{type(err).__name__}: {err}")
        if diff != diff:  # NaN
            return PathCheck(path, None, self.tolerance, "logits are NaN")
        return PathCheck(path, diff, self.tolerance)

    def _run(self, forward: Forward) -> float:
        """The serving shapes through `forward`; the largest |difference| from the reference."""
        model, device, dtype = self.model, self.device, self.model.dtype
        worst = 0.0

        def compare(logits: torch.Tensor, row: int, position: int) -> None:
            nonlocal worst
            worst = max(worst, float((logits.float() - self.reference[row][position].float()).abs().max()))

        shared = RowBuffer(model, len(self.shared), device, dtype)
        start = 0
        for size in SHARED_CHUNKS:  # chunked prefill of the shared run
            logits = forward([Row([], shared, self.shared[start : start + size])])
            start += size
            compare(logits[0], 0, start - 1)
        run = KVRun(shared.keys, shared.values)
        rows = []
        for index, tail in enumerate(self.tails):
            buffer = RowBuffer(model, len(self.shared) + len(tail), device, dtype)
            by_reference = index < len(self.tails) - 1
            if not by_reference:
                buffer.append_run(run, run.num_tokens)
            rows.append(Row([run] if by_reference else [], buffer, tail[: -DECODE_TOKENS]))
        for step in range(DECODE_TOKENS + 1):  # the prompts together, then decode steps together
            logits = forward(rows)
            for index, (row, tail) in enumerate(zip(rows, self.tails, strict=True)):
                fed = len(tail) - DECODE_TOKENS + step
                compare(logits[index], index, len(self.shared) + fed - 1)
                row.token_ids = tail[fed : fed + 1]
        return worst


def _full_logits(model: PreTrainedModel, device: torch.device, ids: list[int]) -> torch.Tensor:
    """The model's own forward over the whole sequence, no cache: logits [T, vocab]."""
    return model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0]


def _stock_cache_diff(
    model: PreTrainedModel, device: torch.device, shared: list[int], tail: list[int], reference: torch.Tensor
) -> float:
    """How far the model's own incremental forward (as `generate` runs it: a stock cache, the
    shared part, then the prompt tail, then one token at a time) lands from its full forward."""
    cache = DynamicCache(config=model.config)
    pieces = [shared, tail[: -DECODE_TOKENS], *([t] for t in tail[-DECODE_TOKENS:])]
    worst, end = 0.0, 0
    for piece in pieces:
        end += len(piece)
        out = model(
            input_ids=torch.tensor([piece], device=device),
            attention_mask=torch.ones((1, end), dtype=torch.long, device=device),
            cache=cache, use_cache=True,
        )  # fmt: skip
        worst = max(worst, float((out.logits[0, -1].float() - reference[end - 1].float()).abs().max()))
    return worst
