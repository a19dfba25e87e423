"""The sentiment monitor end to end, through the public client: a tiny BERT classifier is
fine-tuned in a real worker on generated negative/neutral/positive text and registered;
a monitor over it with a webhook to a local receiver is fed batches (each classified by
a predict job in the worker). A calm feed raises nothing; a run of negative items raises
exactly one alert event and one signed delivery (verified with the tenant's secret);
more negative items raise no second one (hysteresis)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelyard.client import Client
from modelyard.webhooks import verify_webhook
from tests.e2e.test_webhooks import Receiver, receiver  # noqa: F401 (module fixture)
from tests.support.harness import Stack, wait_for
from tests.support.services import RedisServer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    # The evaluation and its CAS run the same SQL on both; the API tests cover SQLite.
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]

BASE = "tiny-bert-sentiment"
LABELS = ["negative", "neutral", "positive"]
WORDS = {
    "negative": ["late", "damaged", "never", "refund", "weak", "war"],
    "neutral": ["london", "paris", "helsinki", "conference", "spring", "program"],
    "positive": ["quick", "friendly", "clean", "quiet", "good", "bright"],
}
WINDOW = 10


def sentence(rng: random.Random, label: str) -> str:
    return " ".join(rng.choices(WORDS[label], k=4))


def write_dataset(path: Path, rows: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(rows):
        label = LABELS[i % 3]
        lines.append(f"{sentence(rng, label)},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def mon_stack(
    database_url: str, broker: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    from tests.support.tiny_encoder import build_tiny_bert_classifier

    s = Stack(
        tmp_path_factory.mktemp("stack"),
        database_url,
        broker.url,
        webhook_allowed_destinations='["127.0.0.1/32"]',
        webhook_poll_s="0.2",
    )
    build_tiny_bert_classifier(s.workdir / "data" / "models" / BASE, LABELS)
    try:
        s.start_api()
        s.start_beat()
        s.start_worker()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(mon_stack: Stack) -> Iterator[Client]:
    with Client(mon_stack.base_url, api_key=mon_stack.api_key, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def secret(client: Client) -> str:
    value: str = client.rotate_webhook_secret()["secret"]
    return value


@pytest.fixture(scope="module")
def classifier(mon_stack: Stack, client: Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A registered classifier fine-tuned on the three vocabularies."""
    data = client.upload_dataset(write_dataset(tmp_path_factory.mktemp("data") / "news.csv"))
    job = client.submit(
        "finetune",
        {
            "base_model": BASE,
            "task": "sequence_classification",
            "training_dataset": data["id"],
            "suffix": "news",
            "hyperparameters": {
                "max_steps": 60,
                "batch_size": 16,
                "learning_rate": 5e-3,
                "seed": 1,
            },
        },
    )
    done = mon_stack.wait_status(job["id"], ("succeeded", "failed", "cancelled"), timeout=240)
    assert done["status"] == "succeeded", f"{done}\n{mon_stack.logs()}"
    name: str = done["result"]["model"]
    assert client.model(name)["labels"] == LABELS
    return name


def feed_and_wait(
    stack: Stack, client: Client, monitor_id: str, texts: list[str]
) -> dict[str, Any]:
    """Post one batch and wait until its predict job's evaluation is recorded."""
    before = len(client.monitor(monitor_id)["history"])
    accepted = client.feed_monitor(monitor_id, texts)
    done = stack.wait_status(accepted["job_id"], ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", f"{done}\n{stack.logs()}"
    mon: dict[str, Any] = wait_for(
        lambda: (m := client.monitor(monitor_id)) and len(m["history"]) > before and m,
        30,
        "the batch's evaluation",
    )
    return mon


def alert_deliveries(client: Client, monitor_id: str) -> list[dict[str, Any]]:
    rows = client.webhook_deliveries(limit=100)["data"]
    return [
        d
        for d in rows
        if d["event"] == "alert" and d["payload"]["data"]["monitor_id"] == monitor_id
    ]


def test_a_negative_run_alerts_once_and_a_calm_feed_never(
    mon_stack: Stack,
    client: Client,
    classifier: str,
    secret: str,
    receiver: Receiver,  # noqa: F811
) -> None:
    rng = random.Random(7)
    path = "/monitor-alerts"
    mon = client.create_monitor(
        "newswire",
        classifier,
        window={"items": WINDOW},
        rule={"share_above": 0.5, "min_items": WINDOW},
        webhook_url=receiver.url + path,
    )
    assert (mon["state"], mon["negative_label"]) == ("ok", "negative")

    for _ in range(2):  # calm: positive and neutral news
        calm = [sentence(rng, LABELS[1 + i % 2]) for i in range(WINDOW)]
        got = feed_and_wait(mon_stack, client, mon["id"], calm)
        assert got["state"] == "ok"
        assert got["current"]["negative_share"] < 0.5
    assert client.monitor_alerts(mon["id"])["data"] == []
    assert alert_deliveries(client, mon["id"]) == []

    run = [sentence(rng, "negative") for _ in range(WINDOW)]
    got = feed_and_wait(mon_stack, client, mon["id"], run)
    assert got["state"] == "alerting"
    assert got["current"]["negative_share"] > 0.5
    for _ in range(2):  # the run goes on: no second alert
        more = [sentence(rng, "negative") for _ in range(WINDOW)]
        got = feed_and_wait(mon_stack, client, mon["id"], more)
        assert got["state"] == "alerting"
    assert got["items"] == {"posted": 5 * WINDOW, "classified": 5 * WINDOW, "pending": 0}
    assert [s["alerted"] for s in got["history"]] == [False, False, True, False, False]

    alerts = client.monitor_alerts(mon["id"])["data"]
    assert len(alerts) == 1
    (delivery,) = alert_deliveries(client, mon["id"])
    assert delivery["id"] == alerts[0]["delivery_id"]
    wait_for(lambda: receiver.at(path), 30, "the alert delivery")
    (posted,) = receiver.at(path)
    verify_webhook(posted.headers, posted.body, secret)
    message = json.loads(posted.body)
    assert message["type"] == "monitor.alert"
    assert message["data"]["alert_id"] == alerts[0]["id"]
    assert message["data"]["negative_share"] == pytest.approx(alerts[0]["negative_share"])
    wait_for(
        lambda: client.webhook_delivery(delivery["id"])["status"] == "delivered",
        30,
        "the delivery recorded as delivered",
    )
    assert len(receiver.at(path)) == 1
