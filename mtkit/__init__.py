"""mtkit: an encoder-decoder Transformer toolkit for machine translation."""

__version__ = "0.2.0"
