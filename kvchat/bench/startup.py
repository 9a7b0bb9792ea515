"""How long a start takes, measured from outside: a fresh interpreter, the second of two starts
(the first may convert the bundled model)."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from kvchat.first_page import MARKER

ROOT = Path(__file__).resolve().parents[2]
FIRST_PAGE_POLL_S = 0.05
READY_POLL_S = 0.25  # gentle: polling the app competes with its own start for the two cores


def engine_startup_s(model: str | None, device: str, dtype: str) -> float:
    """Seconds from a fresh interpreter to a ready engine (no UI)."""
    code = (
        "from kvchat import Engine; "
        f"Engine.load(model={model!r}, device={device!r}, dtype={dtype!r}, usage_db=None)"
    )
    seconds = 0.0
    for _ in range(2):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
        seconds = time.perf_counter() - started
    return seconds


def app_startup_s(model: str | None, device: str, dtype: str) -> dict[str, float | None]:
    """`python app.py`, from the process start: the first page answering, the Gradio page, and
    the model ready (`kvchat_model_ready` 1 on /metrics)."""
    timings: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory() as disk:
        for _ in range(2):
            timings = _one_app_start(model, device, dtype, disk)
    return timings


def _one_app_start(model: str | None, device: str, dtype: str, disk: str) -> dict[str, float | None]:
    port = _free_port()
    args = ["--port", str(port), "--usage-db", "none", "--disk-dir", disk, "--device", device, "--dtype", dtype]
    url = f"http://127.0.0.1:{port}/"
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "app.py", *args, *(["--model", model] if model else [])], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    found: dict[str, float | None] = {"first_page_s": None, "app_page_s": None, "app_ready_s": None}
    try:
        while time.perf_counter() - started < 600 and found["app_ready_s"] is None and process.poll() is None:
            headers = _get_headers(url)
            now = time.perf_counter() - started
            if headers is not None and found["first_page_s"] is None:
                found["first_page_s"] = now
            if headers is not None and MARKER not in headers and found["app_page_s"] is None:
                found["app_page_s"] = now
            if found["app_page_s"] is not None and _ready(url):
                found["app_ready_s"] = time.perf_counter() - started
            time.sleep(FIRST_PAGE_POLL_S if found["first_page_s"] is None else READY_POLL_S)
    finally:
        process.terminate()
        process.wait(60)
    return {key: None if value is None else round(value, 2) for key, value in found.items()}


def _get_headers(url: str) -> dict[str, str] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return dict(response.headers)
    except OSError:
        return None


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "metrics", timeout=5) as response:
            return any(line.startswith("kvchat_model_ready{") and line.endswith(" 1.0")
                       for line in response.read().decode().splitlines())  # fmt: skip
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
