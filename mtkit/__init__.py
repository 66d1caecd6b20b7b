"""mtkit: a machine translation toolkit for encoder-decoder and decoder-only Transformers."""

__version__ = "0.2.0"
