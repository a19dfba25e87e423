"""The heartbeat's lease checks when the renewals themselves hang (a host cut off from the
database and Redis: every call waits for its connect timeout), on a real database and Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from db.jobs import LeaseState
from db.session import migrate
from tests.support.services import redis_db_index
from workers import heartbeat as heartbeat_module
from workers.context import RunContext
from workers.heartbeat import Heartbeat


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Iterator[Settings]:
    migrate(database_url)
    with redis_db_index() as broker:
        yield Settings(
            data_dir=tmp_path,
            database_url=database_url,
            broker_url=broker,
            lease_ttl_s=3.0,
            heartbeat_interval_s=1.0,
            stop_grace_s=60,
        )


class _HangingLeases:
    """Broker leases whose every call hangs, as on a host cut off from Redis."""

    def __init__(self, release: threading.Event) -> None:
        self._release = release

    def renew(self, *args: Any) -> bool:
        self._release.wait(30)
        return True

    def release(self, *args: Any) -> bool:
        return True


def test_a_worker_whose_renewals_hang_stops_its_job_before_the_lease_can_run_out(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    unblock = threading.Event()

    def hanging_renewal(*args: Any, **kwargs: Any) -> Any:
        unblock.wait(30)
        raise heartbeat_module.DATABASE_UNAVAILABLE[0]("cut off", None, Exception())

    monkeypatch.setattr(heartbeat_module, "renew_lease", hanging_renewal)
    leased_at = time.monotonic()
    ctx = RunContext(job_id="job_cut_off", attempt=1, device="cpu", leased_at=leased_at)
    beat = Heartbeat(settings, ctx, "host-a:1", _HangingLeases(unblock))  # type: ignore[arg-type]
    beat.start()
    try:
        # Both renewing threads are stuck in their first call; the watchdog still tells the
        # runner to stop, a TTL less one interval after the claim, before the lease can end.
        assert ctx.stop_event.wait(10)
        stopped = time.monotonic()
        assert ctx.lease_lost and ctx.stop_reason == "lease lost"
        assert not unblock.is_set()  # asked while every renewal still hung
        assert beat.silence_limit_s <= stopped - leased_at < settings.lease_ttl_s
    finally:
        unblock.set()
        beat.stop()


class _RecordingLeases:
    """Broker leases that note when they were renewed."""

    def __init__(self) -> None:
        self.renewed: list[float] = []

    def renew(self, *args: Any) -> bool:
        self.renewed.append(time.monotonic())
        return True

    def release(self, *args: Any) -> bool:
        return True


def test_an_attempt_shorter_than_a_check_period_starts_no_renewing_thread(
    settings: Settings,
) -> None:
    # a check period (a quarter of the interval) of 2 s: long beside start-then-stop
    quiet = settings.model_copy(update={"heartbeat_interval_s": 8.0, "lease_ttl_s": 300.0})
    ctx = RunContext(job_id="job_short", attempt=1, device="cpu", leased_at=time.monotonic())
    leases = _RecordingLeases()
    beat = Heartbeat(quiet, ctx, "host-a:1", leases)  # type: ignore[arg-type]
    beat.start()
    beat.stop()
    time.sleep(quiet.heartbeat_interval_s / 4 + 0.5)  # past the watchdog's next check
    assert beat._thread.ident is None and beat._broker_thread.ident is None
    assert leases.renewed == [] and not ctx.stop_event.is_set()


def test_a_longer_attempt_renews_one_interval_after_it_began(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    renewed: list[float] = []

    def recording_renewal(*args: Any, **kwargs: Any) -> Any:
        renewed.append(time.monotonic())
        return LeaseState(held=True, cancel_requested=False)

    monkeypatch.setattr(heartbeat_module, "renew_lease", recording_renewal)
    # no job row behind this attempt: its progress event and webhook are not written
    monkeypatch.setattr(heartbeat_module, "append_event", lambda *a, **k: None)
    monkeypatch.setattr(heartbeat_module, "queue_delivery", lambda *a, **k: None)
    ctx = RunContext(job_id="job_long", attempt=1, device="cpu", leased_at=time.monotonic())
    leases = _RecordingLeases()
    beat = Heartbeat(settings, ctx, "host-a:1", leases)  # type: ignore[arg-type]
    began = time.monotonic()
    beat.start()
    try:
        time.sleep(settings.heartbeat_interval_s * 2.5)
    finally:
        beat.stop()
    interval = settings.heartbeat_interval_s
    for times in (renewed, leases.renewed):  # the database lease and the broker's
        assert len(times) >= 2
        assert times[0] - began >= interval * 0.95  # not sooner than one interval in
        assert times[1] - times[0] >= interval * 0.95
    assert not ctx.stop_event.is_set() and beat.broker_lease_taken


@pytest.fixture
def watchdog_wakes(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When the process's lease watchdog is woken (`_wake.set`), with renewals that always
    hold and record nothing."""
    monkeypatch.setattr(
        heartbeat_module, "renew_lease", lambda *a, **k: LeaseState(True, cancel_requested=False)
    )
    monkeypatch.setattr(heartbeat_module, "append_event", lambda *a, **k: None)
    monkeypatch.setattr(heartbeat_module, "queue_delivery", lambda *a, **k: None)
    wakes: list[float] = []
    real_set = heartbeat_module._watchdog._wake.set

    def counted_set() -> None:
        wakes.append(time.monotonic())
        real_set()

    monkeypatch.setattr(heartbeat_module._watchdog._wake, "set", counted_set)
    return wakes


def _beat_for(settings: Settings, job_id: str) -> Heartbeat:
    ctx = RunContext(job_id=job_id, attempt=1, device="cpu", leased_at=time.monotonic())
    return Heartbeat(settings, ctx, "host-a:1", _RecordingLeases())  # type: ignore[arg-type]


def _wait_for_timed_look() -> None:
    """Until the watchdog looks on a timer (it has checked a heartbeat)."""
    deadline = time.monotonic() + 10
    while heartbeat_module._watchdog._waiting_s is None and time.monotonic() < deadline:
        time.sleep(0.01)


def _wait_until_started(thread: threading.Thread) -> None:
    deadline = time.monotonic() + 10
    while thread.ident is None and time.monotonic() < deadline:
        time.sleep(0.005)


def test_an_attempt_begun_after_the_last_one_ended_is_watched_without_a_wake(
    settings: Settings, watchdog_wakes: list[float]
) -> None:
    """Between short jobs the watchdog keeps looking on a timer (the last check period it
    used) instead of an untimed wait, so the next attempt needs no wake: a wake per
    attempt cost a thread switch per short job. The next attempt's renewing threads still
    start once it has run for a check period."""
    watchdog = heartbeat_module._watchdog
    first, second = _beat_for(settings, "job_before"), _beat_for(settings, "job_after")
    period = first.check_every_s
    first.start()
    _wait_for_timed_look()
    first.stop()
    time.sleep(2 * period + 0.1)  # the watchdog looks at least once with no heartbeat
    assert watchdog._waiting_s is not None and watchdog._waiting_s <= period
    woken = len(watchdog_wakes)
    began = time.monotonic()
    second.start()
    try:
        assert len(watchdog_wakes) == woken  # no wake: its timed wait ends within a period
        _wait_until_started(second._thread)
        assert second._thread.ident is not None
        assert period <= time.monotonic() - began <= 2 * period + 1.0  # loaded machine
    finally:
        second.stop()


def test_an_attempt_begun_while_others_run_is_watched_without_a_wake(
    settings: Settings, watchdog_wakes: list[float]
) -> None:
    """The watchdog is woken for a new attempt only from its untimed wait: while it already
    checks others, it reaches the new one within a check period, and starts its renewing
    threads once it has run for one."""
    watchdog = heartbeat_module._watchdog
    first, second = _beat_for(settings, "job_first"), _beat_for(settings, "job_second")
    period = first.check_every_s
    first.start()
    try:
        _wait_for_timed_look()
        assert watchdog._waiting_s is not None and watchdog._waiting_s <= period
        woken = len(watchdog_wakes)
        began = time.monotonic()
        second.start()
        assert len(watchdog_wakes) == woken  # no wake: its timed wait ends within a period
        _wait_until_started(second._thread)
        started = time.monotonic()
        assert second._thread.ident is not None
        assert period <= started - began <= 2 * period + 1.0  # slack for a loaded machine
        # the broker lease's thread is started right after, by the same call
        _wait_until_started(second._broker_thread)
        assert second._broker_thread.ident is not None
    finally:
        second.stop()
        first.stop()
