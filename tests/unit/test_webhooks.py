"""Webhook signatures (Standard Webhooks), destination checks and retry waits."""

from __future__ import annotations

import random
import time

import pytest

from core.enums import WebhookEvent
from core.errors import WebhookDestinationError
from core.webhooks import MAX_BACKOFF_S, backoff_s, check_destination, event_for_status
from modelyard.webhooks import (
    WebhookVerificationError,
    new_secret,
    sign,
    signature_headers,
    verify_webhook,
)

BODY = b'{"type":"job.completed","data":{"job_id":"job_1"}}'


def test_a_signed_delivery_verifies() -> None:
    secret = new_secret()
    headers = signature_headers([secret], "whd_1", int(time.time()), BODY)
    verify_webhook(headers, BODY, secret)
    verify_webhook({k.title(): v for k, v in headers.items()}, BODY, secret)  # any case


def test_the_signature_is_the_standard_webhooks_one() -> None:
    # The example of the Standard Webhooks specification (svix test vector).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == expected


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h, b: (h, b + b" "),
        lambda h, b: (h, b.replace(b"job_1", b"job_2")),
        lambda h, b: ({**h, "webhook-id": "whd_2"}, b),
        lambda h, b: ({**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) + 1)}, b),
        lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b),
    ],
    ids=["body-appended", "body-changed", "id-changed", "timestamp-changed", "no-signature"],
)
def test_a_tampered_delivery_fails(tamper: object) -> None:
    secret = new_secret()
    headers = signature_headers([secret], "whd_1", int(time.time()), BODY)
    bad_headers, bad_body = tamper(headers, BODY)  # type: ignore[operator]
    with pytest.raises(WebhookVerificationError):
        verify_webhook(bad_headers, bad_body, secret)


def test_an_old_or_future_timestamp_fails_even_when_signed() -> None:
    secret = new_secret()
    now = time.time()
    for stamp in (int(now) - 301, int(now) + 301):
        headers = signature_headers([secret], "whd_1", stamp, BODY)
        with pytest.raises(WebhookVerificationError, match="tolerance"):
            verify_webhook(headers, BODY, secret, now=now)


def test_another_secret_fails_and_rotation_signs_with_both() -> None:
    old, new = new_secret(), new_secret()
    headers = signature_headers([new, old], "whd_1", int(time.time()), BODY)
    verify_webhook(headers, BODY, old)
    verify_webhook(headers, BODY, new)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(headers, BODY, new_secret())


def fake_dns(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError("no such host")
        return table[host]

    return resolve


DNS = fake_dns(
    {
        "hooks.example.com": ["93.184.216.34"],
        "localhost": ["127.0.0.1", "::1"],
        "internal.example.com": ["10.1.2.3"],
        "rebind.example.com": ["93.184.216.34", "192.168.1.10"],
        "metadata.example.com": ["169.254.169.254"],
    }
)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://0.0.0.0/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://metadata.example.com/",
        "http://10.0.0.5/hook",
        "http://172.16.0.1/hook",
        "http://192.168.0.1/hook",
        "http://internal.example.com/hook",
        "http://rebind.example.com/hook",
        "http://[fd00::1]/hook",
        "http://[fe80::1]/hook",
        "http://224.0.0.1/hook",
        "http://100.64.0.1/hook",
        "ftp://hooks.example.com/hook",
        "file:///etc/passwd",
        "http://user:pw@hooks.example.com/hook",
        "http://nowhere.example.com/hook",
        "http:///hook",
    ],
)
def test_non_public_or_odd_destinations_are_refused(url: str) -> None:
    with pytest.raises(WebhookDestinationError) as info:
        check_destination(url, resolver=DNS)
    assert info.value.param == "webhook_url"


def test_public_destinations_and_allowlisted_ones_pass() -> None:
    assert check_destination("https://hooks.example.com/h", resolver=DNS) == ["93.184.216.34"]
    assert check_destination("http://127.0.0.1:9/h", ["127.0.0.1/32"], DNS) == ["127.0.0.1"]
    assert check_destination("http://localhost/h", ["localhost"], DNS) == ["127.0.0.1", "::1"]
    with pytest.raises(WebhookDestinationError):  # the allowlist is exact, not "any loopback"
        check_destination("http://127.0.0.2/h", ["127.0.0.1/32"], DNS)


def test_status_changes_that_send_webhooks() -> None:
    assert event_for_status("running") is WebhookEvent.STARTED
    for status in ("succeeded", "failed", "cancelled", "expired"):
        assert event_for_status(status) is WebhookEvent.COMPLETED
    assert event_for_status("queued") is None
    assert event_for_status("nonsense") is None


def test_backoff_doubles_with_jitter_and_is_capped_at_an_hour() -> None:
    rng = random.Random(1)
    waits = [backoff_s(n, 30.0, rng) for n in range(1, 13)]
    for n, wait in enumerate(waits, start=1):
        nominal = min(30.0 * 2 ** (n - 1), MAX_BACKOFF_S)
        assert 0.8 * nominal <= wait <= 1.2 * nominal
    assert len({round(w, 6) for w in waits}) == len(waits)  # jittered, not lock-step
    assert sum(waits[:11]) > 4 * 3600  # the 11 waits between 12 attempts span hours
