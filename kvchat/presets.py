"""System-prompt presets: one Markdown file each under assets/presets/, ordered by file name."""

from __future__ import annotations

from pathlib import Path

PRESETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "presets"


def title_of(path: Path) -> str:
    """'3-acme-cloud-support-faq-long.md' -> 'Acme cloud support faq (long)'."""
    words = path.stem.split("-")
    if words[0].isdigit():
        words = words[1:]
    long = words[-1] == "long"
    title = " ".join(words[:-1] if long else words).capitalize()
    return f"{title} (long)" if long else title


def load_presets(directory: Path = PRESETS_DIR) -> dict[str, str]:
    return {title_of(path): path.read_text(encoding="utf-8").strip() for path in sorted(directory.glob("*.md"))}
