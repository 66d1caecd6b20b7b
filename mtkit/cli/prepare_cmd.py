"""Placeholder: being written."""


def prepare() -> None:
    """Not written yet."""
    raise SystemExit("not written yet")
