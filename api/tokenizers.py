"""Tokenizers (and context lengths) of local models, kept by the API to check prompts."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _stamp(directory: Path) -> int:
    files = [*directory.glob("tokenizer*.json"), directory / "config.json"]
    return max((f.stat().st_mtime_ns for f in files if f.exists()), default=0)


@lru_cache(maxsize=16)
def _load(directory: str, stamp: int) -> tuple[Any, int | None]:
    from transformers import AutoConfig, AutoTokenizer

    from core.prompts import context_length

    logger.info("loading the tokenizer of %s to check prompts", directory)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    return tokenizer, context_length(config)


def local_tokenizer(directory: Path) -> tuple[Any, int | None] | None:
    """(tokenizer, context length) of a local model directory; None if it has no tokenizer."""
    if (
        not (directory / "tokenizer.json").exists()
        and not (directory / "tokenizer_config.json").exists()
    ):
        return None
    try:
        return _load(str(directory.resolve()), _stamp(directory))
    except (OSError, ValueError):
        logger.warning("could not load the tokenizer of %s; prompts not checked", directory)
        return None
