"""System-prompt presets: one Markdown file each under assets/presets/, ordered by file name.

In a checkout (or `pip install -e .`) they are read from assets/presets/; `pip install .` copies
them to <prefix>/share/kvchat/presets/.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

CHECKOUT_DIR = Path(__file__).resolve().parent.parent / "assets" / "presets"
INSTALLED_DIR = Path(sys.prefix) / "share" / "kvchat" / "presets"
PRESETS_DIR = CHECKOUT_DIR if CHECKOUT_DIR.is_dir() else INSTALLED_DIR


def title_of(path: Path) -> str:
    """'3-acme-cloud-support-faq-long.md' -> 'Acme cloud support faq (long)'."""
    words = path.stem.split("-")
    if words[0].isdigit():
        words = words[1:]
    long = words[-1] == "long"
    title = " ".join(words[:-1] if long else words).capitalize()
    return f"{title} (long)" if long else title


def load_presets(directory: Path = PRESETS_DIR, extra: Sequence[Path] = ()) -> dict[str, str]:
    """Title -> system prompt, the bundled ones first, then `extra` files (--preset-file)."""
    paths = [*sorted(directory.glob("*.md")), *extra]
    return {title_of(path): path.read_text(encoding="utf-8").strip() for path in paths}
