"""What an offline W&B run recorded, read from its `run-<id>.wandb` file: wandb 0.31 keeps
no reader of its own in Python (its Go core writes the file). The file is a 7-byte header
then LevelDB-log records (32 KiB blocks; each chunk a CRC, a length, a type) holding
wandb's own `Record` protobufs."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

HEADER = 7  # b":W&B", a 2-byte magic, a version byte
BLOCK = 32 * 1024
CHUNK_HEADER = 7  # crc32 (4), length (2, little-endian), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:4]
    found: list[Any] = []
    position, pending = HEADER, b""
    while position + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < CHUNK_HEADER:  # the block's tail is padding
            position += left_in_block
            continue
        length, kind = struct.unpack_from("<HB", data, position + 4)
        chunk = data[position + CHUNK_HEADER : position + CHUNK_HEADER + length]
        position += CHUNK_HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            found.append(record)
    return found


def _key(item: Any) -> str:
    return str(item.key or "/".join(item.nested_key))


def history(path: Path) -> list[dict[str, Any]]:
    """Each `run.log` call's values, in order."""
    return [
        {_key(i): json.loads(i.value_json) for i in r.history.item}
        for r in records(path)
        if r.WhichOneof("record_type") == "history"
    ]


def config(path: Path) -> dict[str, Any]:
    """The run's config (what `wandb.init` was given, then each update), in order."""
    merged: dict[str, Any] = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        updates = r.run.config.update if kind == "run" else r.config.update
        if kind in ("run", "config"):
            merged.update({_key(i): json.loads(i.value_json) for i in updates})
    return merged
