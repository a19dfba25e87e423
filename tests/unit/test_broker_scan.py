"""The broker scan against a real Redis and messages published by Celery and taken by kombu:
which jobs have a message on a queue, which are delivered and unacknowledged, which none."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery.utils.saferepr import saferepr

from core.broker_scan import BrokerScanner, Delivery, Presence, job_id_of
from core.dispatch import TASK_RUN_JOB, JobPublisher, make_celery
from core.enums import QUEUE_FOR_KIND, JobKind
from core.settings import Settings
from tests.support.broker import receive_and_vanish
from tests.support.services import redis_db_index


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with redis_db_index() as broker:
        yield Settings(data_dir=Path(tmp_path_factory.mktemp("data")), broker_url=broker)


@pytest.fixture
def publisher(settings: Settings) -> Iterator[JobPublisher]:
    broker = redis.Redis.from_url(settings.broker_url)
    broker.flushdb()
    pub = JobPublisher(settings)
    yield pub
    pub.close()
    broker.close()


def new_id() -> str:
    return uuid.uuid4().hex


def test_published_messages_are_found_on_every_priority_list(
    settings: Settings, publisher: JobPublisher
) -> None:
    jobs = {(new_id(), kind, priority) for kind in JobKind for priority in (0, 4, 9)}
    for job_id, kind, priority in jobs:
        publisher.publish(job_id, kind, priority)
    found = publisher.messages()
    assert found.queued == {job_id for job_id, _, _ in jobs}
    assert found.unacked == {}
    assert (found.scanned, found.unreadable) == (len(jobs), 0)
    assert found.presence(new_id()) is Presence.ABSENT
    # the scanner reads the very keys kombu wrote
    keys = {
        str(k) for k in redis.Redis.from_url(settings.broker_url, decode_responses=True).scan_iter()
    }
    scanner = BrokerScanner(
        redis.Redis.from_url(settings.broker_url),
        set(QUEUE_FOR_KIND.values()),
        make_celery(settings).conf.broker_transport_options,
        TASK_RUN_JOB,
    )
    # priorities 0, 4, 9 are kombu's steps 9, 5, 0
    lists = {k for k in keys if k.startswith(("generate", "train"))}
    assert lists == {"generate", "generate:5", "generate:9", "train", "train:5", "train:9"}
    assert lists <= set(scanner.lists)


def test_small_chunks_read_whole_lists(settings: Settings, publisher: JobPublisher) -> None:
    ids = [new_id() for _ in range(53)]
    for job_id in ids:
        publisher.publish(job_id, JobKind.GENERATE, 2)
    scanner = BrokerScanner(
        redis.Redis.from_url(settings.broker_url),
        ["generate"],
        make_celery(settings).conf.broker_transport_options,
        TASK_RUN_JOB,
        chunk=7,
    )
    found = scanner.scan()
    assert found.queued == set(ids)
    assert found.scanned == 53


def test_a_message_taken_by_a_consumer_is_unacked_until_acked_or_forgotten(
    settings: Settings, publisher: JobPublisher
) -> None:
    taken, waiting = new_id(), new_id()
    celery = make_celery(settings)
    publisher.publish(taken, JobKind.GENERATE, 0)
    before = time.time()
    tag = receive_and_vanish(celery, "generate")
    publisher.publish(waiting, JobKind.GENERATE, 0)
    found = publisher.messages()
    assert found.presence(taken) is Presence.UNACKED
    assert found.presence(waiting) is Presence.QUEUED
    (delivery,) = found.deliveries(taken)
    assert delivery.tag == tag
    assert delivery.delivered_at is not None
    assert before - 1 <= delivery.delivered_at <= time.time() + 1
    assert not delivery.older_than(60, time.time())
    assert delivery.older_than(0, time.time() + 1)

    assert publisher.forget_delivery(delivery)
    assert not publisher.forget_delivery(delivery)  # gone already: nothing removed
    broker = redis.Redis.from_url(settings.broker_url)
    assert broker.hlen("unacked") == 0
    assert broker.zcard("unacked_index") == 0
    assert publisher.messages().presence(taken) is Presence.ABSENT


def test_a_delivery_missing_from_the_index_counts_as_old(
    settings: Settings, publisher: JobPublisher
) -> None:
    job_id = new_id()
    publisher.publish(job_id, JobKind.FINETUNE, 0)
    receive_and_vanish(make_celery(settings), "train")
    redis.Redis.from_url(settings.broker_url).delete("unacked_index")
    (delivery,) = publisher.messages().deliveries(job_id)
    assert delivery.delivered_at is None
    assert delivery.older_than(3600, time.time())


def test_unreadable_and_foreign_messages_are_counted_and_skipped(
    settings: Settings, publisher: JobPublisher
) -> None:
    job_id = new_id()
    publisher.publish(job_id, JobKind.GENERATE, 0)
    broker = redis.Redis.from_url(settings.broker_url)
    (good,) = broker.lrange("generate:9", 0, -1)
    other = json.loads(good)
    other["headers"]["task"] = "modelyard.something_else"
    broken = json.loads(good)
    broken["body"] = "not base64!"
    broker.lpush("generate", b"not json", json.dumps(other), json.dumps(broken), b"[1, 2]")
    broker.hset("unacked", "tag-1", b"{}")
    found = publisher.messages()
    assert found.queued == {job_id}
    assert found.unreadable == 5
    assert found.unacked == {}


def test_task_protocol_one_bodies_are_read_too() -> None:
    body = json.dumps({"task": TASK_RUN_JOB, "args": ["job-1"], "kwargs": {}})
    envelope = {"body": body, "content-type": "application/json", "properties": {}}
    assert job_id_of(envelope, TASK_RUN_JOB) == "job-1"
    assert job_id_of({**envelope, "content-type": "application/x-python-serialize"}, "x") is None
    assert job_id_of({**envelope, "body": json.dumps([[], {}, {}])}, TASK_RUN_JOB) is None
    assert Delivery("t", 100.0).older_than(10, 110.0)


def test_a_published_message_reads_as_celery_would_have_written_it(
    settings: Settings, publisher: JobPublisher
) -> None:
    job_id = new_id()
    publisher.publish(job_id, JobKind.NOOP, 9)
    raw = redis.Redis.from_url(settings.broker_url).lpop(QUEUE_FOR_KIND[JobKind.NOOP])
    assert isinstance(raw, bytes)
    message = json.loads(raw)
    headers = message["headers"]
    assert headers["task"] == TASK_RUN_JOB
    assert job_id_of(message, TASK_RUN_JOB) == job_id
    # the readable args Flower and `celery inspect` show: given, not computed, and the same
    assert headers["argsrepr"] == saferepr([job_id]) == f"['{job_id}']"
    assert headers["kwargsrepr"] == saferepr({})
