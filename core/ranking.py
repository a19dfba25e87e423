"""Which label's probability ranks candidates: shared by the API check and the worker."""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_RANK_LABELS = ("clicked", "1", "positive", "pos", "yes", "true")


def rank_label(labels: Sequence[str], requested: str | None) -> str:
    """`requested` when the model has it, else the first default the model has;
    ValueError naming the model's labels otherwise."""
    names = ", ".join(labels) or "none"
    if requested is not None:
        if requested not in labels:
            raise ValueError(f"label {requested!r} is not one of the model's labels ({names})")
        return requested
    for name in DEFAULT_RANK_LABELS:
        if name in labels:
            return name
    raise ValueError(
        f"the model's labels ({names}) include none of {', '.join(DEFAULT_RANK_LABELS)}; "
        "name the positive one in `label`"
    )
