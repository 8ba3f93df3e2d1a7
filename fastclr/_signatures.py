"""Calls written for a peer's library that would mean something else here fail loudly.

fastclr's functions take their tensors (and the temperature) positionally and every option by
keyword. The loss modules and LARS do the same, but instead of Python's bare "takes 2 positional
arguments" their extra positional arguments reach ``refuse_positional``, whose TypeError names the
keywords and, where a peer's signature puts something else in that place, what it is there and
what to write here.
"""
from __future__ import annotations


def refuse_positional(owner: str, extra: tuple, keywords: str, peers: str = "") -> None:
    """Raise TypeError when ``extra`` (the positional arguments past the accepted ones) is not
    empty: ``owner`` takes ``keywords`` by keyword only; ``peers`` says what the position means
    in the libraries users come from."""
    if not extra:
        return
    shown = ", ".join(_short(x) for x in extra)
    n = len(extra)
    raise TypeError(f"{owner} takes {keywords} by keyword only (since fastclr 0.2.0); got {n} "
                    f"more positional argument{'s' if n > 1 else ''} ({shown}), which would be "
                    f"misread. {peers}".rstrip())


def _short(value) -> str:
    text = type(value).__name__ if hasattr(value, "shape") else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
