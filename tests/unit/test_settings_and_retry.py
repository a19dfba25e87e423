from __future__ import annotations

import errno
from pathlib import Path

import pytest
import redis
from sqlalchemy.exc import OperationalError

from core.enums import FailureType
from core.errors import ConfigurationError, PermanentJobError, TransientJobError
from core.settings import Settings
from workers.failures import retry_delay


def test_database_defaults_to_sqlite_in_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'modelyard.db'}"


def test_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELYARD_LEASE_TTL_S", "7.5")
    monkeypatch.setenv("MODELYARD_BROKER_URL", "redis://example:1/2")
    settings = Settings()
    assert settings.lease_ttl_s == 7.5
    assert settings.broker_url == "redis://example:1/2"


def test_retry_delay_doubles_and_caps() -> None:
    settings = Settings(retry_backoff_s=2, retry_backoff_max_s=10)
    assert [retry_delay(settings, n) for n in (1, 2, 3, 4, 5)] == [2, 4, 8, 10, 10]


def test_jitter_only_shortens_the_delay_by_up_to_its_fraction() -> None:
    from workers.failures import jittered_delay

    settings = Settings(retry_backoff_s=4, retry_backoff_max_s=100, retry_jitter=0.5)
    assert jittered_delay(settings, 2, rand=lambda: 0.0) == 8
    assert jittered_delay(settings, 2, rand=lambda: 1.0) == 4
    delays = {round(jittered_delay(settings, 1), 6) for _ in range(50)}
    assert len(delays) > 1 and all(2 <= d <= 4 for d in delays)


@pytest.mark.parametrize(
    ("error", "transient", "failure"),
    [
        (OperationalError("SELECT 1", {}, Exception("gone")), True, "database_unavailable"),
        (redis.ConnectionError("refused"), True, "broker_unavailable"),
        (OSError(errno.ENOSPC, "No space left on device"), True, "disk_full"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory"), False, "out_of_memory"),
        (MemoryError(), False, "out_of_memory"),
        (ValueError("bad"), False, "runtime_error"),
        (TransientJobError("device busy"), True, "transient_error"),
    ],
)
def test_errors_are_named_transient_or_fail_once(
    error: Exception, transient: bool, failure: str
) -> None:
    from workers.failures import classify

    classified = classify(error, Settings())
    assert isinstance(classified, TransientJobError) is transient
    assert classified.failure.value == failure


def test_out_of_memory_is_transient_only_when_allowed() -> None:
    from workers.failures import classify

    oom = PermanentJobError("out of memory on cuda:0", FailureType.OUT_OF_MEMORY)
    assert classify(oom, Settings()) is oom
    retried = classify(oom, Settings(retry_out_of_memory=True))
    assert isinstance(retried, TransientJobError)
    assert retried.failure is FailureType.OUT_OF_MEMORY


def test_worker_refuses_a_visibility_timeout_not_above_the_job_time_limit() -> None:
    from core.dispatch import celery_config, check_broker_timeouts

    check_broker_timeouts(Settings())  # the defaults are safe
    bad = Settings(broker_visibility_timeout_s=3600, job_time_limit_s=7200)
    with pytest.raises(ConfigurationError, match="MODELYARD_BROKER_VISIBILITY_TIMEOUT_S=3600"):
        check_broker_timeouts(bad)
    options = celery_config(bad)["broker_transport_options"]
    assert options["visibility_timeout"] == 3600
