"""Placeholder: being written."""


def translate() -> None:
    """Not written yet."""
    raise SystemExit("not written yet")
