"""The monitor's alert rule as pure functions: thresholds, rises, minimum items and the
level a firing monitor must recover to (hysteresis)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.monitors import (
    AlertRule,
    MonitorWindow,
    WindowCounts,
    default_negative_label,
    firing,
    recovered,
)


def counts(items: int, negative: int) -> WindowCounts:
    return WindowCounts(items, negative, {"negative": negative, "positive": items - negative})


def test_a_share_above_the_threshold_fires_once_the_window_is_full_enough() -> None:
    rule = AlertRule(share_above=0.5, min_items=10)
    assert firing(rule, counts(9, 9), None) is None
    assert firing(rule, counts(10, 5), None) is None  # not above
    fired = firing(rule, counts(10, 6), None)
    assert fired is not None and fired.recover_at_or_below == 0.5
    assert "60% is above 50%" in fired.reason


def test_a_rise_needs_a_full_previous_window_and_recovers_below_the_rise() -> None:
    rule = AlertRule(rise_above=0.3, min_items=4)
    assert firing(rule, counts(4, 4), None) is None
    assert firing(rule, counts(4, 4), counts(3, 0)) is None
    assert firing(rule, counts(10, 4), counts(10, 2)) is None
    fired = firing(rule, counts(10, 6), counts(10, 2))
    assert fired is not None
    assert fired.recover_at_or_below == pytest.approx(0.5)
    assert not recovered(0.6, fired.recover_at_or_below)
    assert recovered(0.5, fired.recover_at_or_below)


def test_with_both_conditions_the_lower_level_must_be_reached() -> None:
    rule = AlertRule(share_above=0.7, rise_above=0.2, min_items=1)
    fired = firing(rule, counts(10, 8), counts(10, 1))
    assert fired is not None and fired.recover_at_or_below == pytest.approx(0.3)
    assert "above 70%" in fired.reason and "rose from 10% to 80%" in fired.reason


def test_rule_window_and_labels_are_validated() -> None:
    with pytest.raises(ValidationError):
        AlertRule(min_items=3)
    with pytest.raises(ValidationError):
        MonitorWindow(items=5, seconds=60)
    with pytest.raises(ValidationError):
        MonitorWindow()
    assert default_negative_label(["POS", "NEG"]) == "NEG"
    assert default_negative_label(["Negative", "neg"]) == "Negative"
    assert default_negative_label(["a", "b"]) is None
