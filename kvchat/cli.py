"""The `kvchat` command (and `python app.py`): options, a page up at once, the model loading in the
background, then the Gradio app.

Order matters on two cores: Gradio takes seconds to import and torch with transformers as long
again, so nothing slow is imported here. The starting page answers first, the engine begins to
load in a thread, and only then is the server (kvchat.server, which imports Gradio) imported in this one.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvchat.config import Config, config_from_args
from kvchat.errors import InputError
from kvchat.first_page import FirstPage
from kvchat.startup import BackgroundEngine

if TYPE_CHECKING:
    from kvchat.engine import Engine

log = logging.getLogger("kvchat.cli")


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(argv)
    except InputError as err:
        print(f"kvchat: {err}", file=sys.stderr)
        return 2
    try:
        first_page = FirstPage(config.host, config.port)
    except OSError as err:
        print(f"kvchat: cannot serve on {config.host}:{config.port} ({err.strerror or err}); is another app "
              "using that port? Choose one with --port", file=sys.stderr)  # fmt: skip
        return 2
    log.info("page up at http://%s:%d/ after %.2f s; loading the model and the app", config.host, config.port,
             time.perf_counter() - started)  # fmt: skip
    holder = BackgroundEngine(lambda: load_engine(config))
    from kvchat.server import serve  # Gradio: seconds to import, while the page above already answers

    return serve(holder, config, first_page)


def load_engine(config: Config) -> Engine:
    from kvchat.engine import Engine
    from kvchat.presets import load_presets

    return Engine.load(
        model=config.model, device=config.device, dtype=config.dtype, quantize=config.quantize,
        cache_budget=config.cache_budget_bytes, usage_db=config.usage_db, store_text=config.store_text,
        home=config.home, presets=load_presets(extra=config.preset_files), options=config.engine_options(),
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
