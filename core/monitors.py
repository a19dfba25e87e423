"""Sentiment monitors: the create request, and the alert rule as pure functions.

A monitor's window is the last N classified items or the items posted in the last T
seconds; the previous window is the N items (or T seconds) before it. The rule fires
when the negative share is above `share_above`, and/or when it rose by at least
`rise_above` (a fraction: 0.2 is 20 points) over the previous window, once the window
holds `min_items`. Alerting has hysteresis: a monitor that alerted stays `alerting`
until the share falls to the level that made it fire (the threshold, or the previous
window's share plus the rise), so a sustained negative run alerts once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from core.specs import MODEL_REF_PATTERN, Prompt

MAX_ITEMS_PER_POST = 256
NEGATIVE_NAMES = ("negative", "neg")

MonitorName = Annotated[str, StringConstraints(min_length=1, max_length=255)]


class MonitorWindow(BaseModel):
    """Exactly one of `items` (the last N classified items) or `seconds` (the items
    posted in the last T seconds)."""

    model_config = ConfigDict(extra="forbid")

    items: int | None = Field(default=None, ge=1, le=100_000)
    seconds: int | None = Field(default=None, ge=1, le=30 * 86_400)

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        if (self.items is None) == (self.seconds is None):
            raise ValueError("give exactly one of items or seconds")
        return self


class AlertRule(BaseModel):
    """When the monitor alerts; at least one of the two conditions."""

    model_config = ConfigDict(extra="forbid")

    share_above: float | None = Field(
        default=None, ge=0, lt=1, description="Alert when the window's negative share is above."
    )
    rise_above: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Alert when the negative share rose by at least this much over the "
        "previous window (0.2 = 20 points).",
    )
    min_items: int = Field(
        default=10, ge=1, le=100_000, description="No alert while the window holds fewer items."
    )

    @model_validator(mode="after")
    def _some_condition(self) -> Self:
        if self.share_above is None and self.rise_above is None:
            raise ValueError("give share_above, rise_above or both")
        return self


class MonitorCreate(BaseModel):
    """`POST /v1/monitors`."""

    model_config = ConfigDict(extra="forbid")

    name: MonitorName
    model: str = Field(
        pattern=MODEL_REF_PATTERN,
        description="A registered (ft:...) or installed sequence-classification model.",
    )
    negative_label: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="The label counted as negative; default: a label named negative/neg.",
    )
    window: MonitorWindow
    rule: AlertRule
    webhook_url: str | None = Field(
        default=None,
        min_length=1,
        max_length=2048,
        description="Where signed `monitor.alert` webhook deliveries are POSTed.",
    )


class MonitorItems(BaseModel):
    """`POST /v1/monitors/{id}/items`: one batch, classified by one predict job."""

    model_config = ConfigDict(extra="forbid")

    texts: list[Prompt] = Field(min_length=1, max_length=MAX_ITEMS_PER_POST)


def default_negative_label(labels: list[str]) -> str | None:
    for name in NEGATIVE_NAMES:
        for label in labels:
            if label.lower() == name:
                return label
    return None


@dataclass(frozen=True)
class WindowCounts:
    """How many classified items a window holds, per label, and how many are negative."""

    items: int
    negative: int
    labels: dict[str, int] = field(default_factory=dict)

    @property
    def negative_share(self) -> float:
        return self.negative / self.items if self.items else 0.0

    def shares(self) -> dict[str, float]:
        return {k: v / self.items for k, v in self.labels.items()} if self.items else {}


@dataclass(frozen=True)
class Firing:
    reason: str
    recover_at_or_below: float  # the share the window must fall to before the next alert


def firing(rule: AlertRule, current: WindowCounts, previous: WindowCounts | None) -> Firing | None:
    """Whether the rule fires on this window (and the level it recovers at), or None."""
    if current.items < rule.min_items:
        return None
    share = current.negative_share
    reasons: list[str] = []
    levels: list[float] = []
    if rule.share_above is not None and share > rule.share_above:
        reasons.append(f"negative share {share:.0%} is above {rule.share_above:.0%}")
        levels.append(rule.share_above)
    if (
        rule.rise_above is not None
        and previous is not None
        and previous.items >= rule.min_items
        and share - previous.negative_share >= rule.rise_above - 1e-9
    ):
        before = previous.negative_share
        reasons.append(
            f"negative share rose from {before:.0%} to {share:.0%} "
            f"(by {share - before:.0%}, rule {rule.rise_above:.0%})"
        )
        levels.append(before + rule.rise_above)
    if not reasons:
        return None
    return Firing("; ".join(reasons), min(levels))


def recovered(share: float, recover_at_or_below: float | None) -> bool:
    return recover_at_or_below is None or share <= recover_at_or_below + 1e-9
