"""Doing to the broker what a consumer does, from a test: take a message as a worker's
kombu consumer takes it (into `unacked`), then vanish without acknowledging it."""

from __future__ import annotations

from celery import Celery


def receive_and_vanish(celery: Celery, queue: str) -> str:
    """Take the next message of `queue` with acknowledgements on, as a consumer that is
    killed right after receiving it: the message stays in kombu's `unacked` hash and
    index. Returns its delivery tag."""
    with celery.connection_for_read() as conn:
        channel = conn.default_channel
        message = channel.basic_get(queue, no_ack=False)
        assert message is not None, f"no message on {queue}"
        channel.do_restore = False  # a killed process restores nothing on its way out
        tag: str = message.delivery_tag
    return tag
