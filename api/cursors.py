"""Opaque keyset cursors: (created_at, key) of the last row of a page; and the bound of
the numeric `after` / Last-Event-ID cursors of event and metric lists."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from datetime import datetime
from typing import TypeVar

from core.errors import InvalidRequestError

T = TypeVar("T")

MAX_ROW_ID = 2**31 - 1  # event and metric ids are 32-bit integers in the database


def encode_cursor(created_at: datetime, key: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{key}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        ts, key = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        parsed = datetime.fromisoformat(ts)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidRequestError("cursor is not one this API returned", param="cursor") from exc
    if parsed.tzinfo is None:
        raise InvalidRequestError("cursor is not one this API returned", param="cursor")
    return parsed, key


def split_page(rows: Sequence[T], limit: int) -> tuple[list[T], bool]:
    """Rows fetched with `limit + 1`: the page itself, and whether more rows follow."""
    return list(rows[:limit]), len(rows) > limit
