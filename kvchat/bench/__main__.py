"""python -m kvchat.bench [--quick] [--out DIR] [--model M] [--device D] [--dtype T] [--peers a,b]"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvchat import models  # noqa: E402
from kvchat.bench import FULL, PEERS, QUICK, measure_startup, missing_dependencies, report, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvchat.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer points and repeats (under 10 minutes on 2 cores)")
    parser.add_argument("--out", default="bench-results", help="where results.json, results.md, ttft.png go")
    parser.add_argument("--model", default=None, help="model directory or hub id (default: bundled SmolLM2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, from {', '.join(PEERS)}; '' for none")
    args = parser.parse_args(argv)
    missing = missing_dependencies()
    if missing:
        print(f"python -m kvchat.bench needs {', '.join(missing)}: pip install -r requirements-bench.txt",
              file=sys.stderr)  # fmt: skip
        return 2
    peers = [p for p in args.peers.split(",") if p]
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)}")
    loaded = models.load(args.model, device=args.device, dtype=args.dtype)
    gguf = str(models.bundled_gguf()) if args.model is None else None
    results = run(loaded, QUICK if args.quick else FULL, peers, quick=args.quick, gguf=gguf,
                  startup_times=lambda: measure_startup(args.model, args.device, args.dtype),
                  out=Path(args.out))  # fmt: skip
    out = Path(args.out)
    written = report.write_all(out, results)
    print(json.dumps(results["summary"], indent=2))
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
