"""The two engines (``mtkit.engines``), for tests that must behave the same with each."""

from __future__ import annotations

import importlib.util

import pytest

from mtkit.config import DecodeConfig
from mtkit.engines import open_translator

needs_ct2 = pytest.mark.skipif(importlib.util.find_spec("ctranslate2") is None, reason="ctranslate2 is not installed")
BACKENDS = ["torch", pytest.param("ctranslate2", marks=needs_ct2)]


def make_translator(loaded, backend: str = "torch", decode: DecodeConfig | None = None, seed: int = 1, **kwargs):
    """A ``Translator`` of a loaded checkpoint as ``mtkit translate --backend BACKEND`` builds it."""
    decode = (decode or loaded.config.decode).model_copy(update={"backend": backend})
    return open_translator(loaded, decode, seed=seed, threads=1, say=print, warn=kwargs.pop("warn", print), **kwargs)
