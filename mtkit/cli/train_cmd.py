"""Placeholder: being written."""


def train() -> None:
    """Not written yet."""
    raise SystemExit("not written yet")
