"""Pillow decodes untrusted corpus images: releases before 12.2 lack the 2026 PSD and FITS
decoder fixes, so neither the pin nor the installed Pillow may be older."""

import re
from pathlib import Path

import PIL

REPO = Path(__file__).resolve().parents[2]
FIXED = (12, 2)


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def test_installed_pillow_has_the_decoder_fixes():
    assert _release(PIL.__version__) >= FIXED, f"Pillow {PIL.__version__} is older than 12.2"


def test_pillow_pin_has_the_decoder_fixes():
    pins = re.findall(r'"pillow==([^"]+)"', (REPO / "pyproject.toml").read_text(), re.IGNORECASE)
    assert len(pins) == 1, f"pyproject.toml should pin pillow exactly once, found {pins}"
    assert _release(pins[0]) >= FIXED, f"pyproject.toml pins Pillow {pins[0]}, older than 12.2"
