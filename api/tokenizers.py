"""Tokenizers (and context lengths) of local models, kept by the API to refuse a generation
job whose prompts cannot be served before it is queued, and to count a dataset's tokens as
training would encode them (GET /v1/datasets/{id}/tokens).

They are built from the files transformers reads (tokenizer.json, tokenizer_config.json,
special_tokens_map.json, chat_template.jinja, config.json) with the `tokenizers` library
and jinja2, so the API process never imports transformers (and so torch). They count as
transformers' fast tokenizer does for a directory with a tokenizer.json: the tokenizer.json
pipeline and post-processor, the named special tokens added when the file lacks them, and
chat templates rendered in the sandbox transformers renders them in. A model whose
tokenizer class rebuilds that pipeline differently may count a token apart; the worker
encodes again with transformers and fails such a job with the same message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer

from core.model_files import files_stamp
from core.prompts import context_length

logger = logging.getLogger(__name__)

SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "config.json",
)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _template_environment() -> ImmutableSandboxedEnvironment:
    """The environment transformers compiles chat templates in (less its `{% generation %}`
    tag, which only marks assistant spans for training masks)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class LocalTokenizer:
    """The part of a transformers tokenizer that core.prompts.encode_prompts and
    core.example_tokens call: `tokenizer(text, text_pair, add_special_tokens=...,
    return_offsets_mapping=...)` (its `input_ids` and `offset_mapping`),
    `tokenizer(words, is_split_into_words=True)`, `eos_token_id`, `chat_template` and
    `apply_chat_template(conversation, tokenize=False, add_generation_prompt=..., tools=...)`."""

    def __init__(
        self, tokenizer: Tokenizer, chat_template: str | None, special_tokens: Mapping[str, str]
    ) -> None:
        self._tokenizer = tokenizer
        self.chat_template = chat_template
        self._special_tokens = dict(special_tokens)
        self._template = (
            _template_environment().from_string(chat_template) if chat_template else None
        )

    is_fast = True  # it gives offsets, as a transformers fast tokenizer does

    def __call__(
        self,
        text: str | list[str],
        text_pair: str | None = None,
        add_special_tokens: bool = True,
        is_split_into_words: bool = False,
        return_offsets_mapping: bool = False,
    ) -> dict[str, list[Any]]:
        encoding = self._tokenizer.encode(
            text,
            text_pair,
            is_pretokenized=is_split_into_words,
            add_special_tokens=add_special_tokens,
        )
        encoded: dict[str, list[Any]] = {"input_ids": list(encoding.ids)}
        if return_offsets_mapping:
            encoded["offset_mapping"] = list(encoding.offsets)
        return encoded

    @property
    def eos_token_id(self) -> int | None:
        eos = self._special_tokens.get("eos_token")
        return None if eos is None else self._tokenizer.token_to_id(eos)

    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]],
        tokenize: bool = False,
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        if self._template is None:
            raise ValueError("this tokenizer has no chat template")
        if tokenize:
            raise ValueError("the API's tokenizer renders the template; encode the text after")
        messages = [{k: v for k, v in m.items() if v is not None} for m in conversation]
        return self._template.render(
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self._special_tokens,
        )


def _json_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    loaded = json.loads(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _chat_template(directory: Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja when there is one (transformers prefers it), else the config's
    template (a string, or named templates of which `default` is used)."""
    template_file = directory / "chat_template.jinja"
    if template_file.exists():
        return template_file.read_text(encoding="utf-8")
    configured = tokenizer_config.get("chat_template")
    if isinstance(configured, str):
        return configured
    if isinstance(configured, list):
        named = {t.get("name"): t.get("template") for t in configured if isinstance(t, dict)}
        default = named.get("default")
        return default if isinstance(default, str) else None
    return None


def _special_tokens(directory: Path, tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens, from tokenizer_config.json over special_tokens_map.json."""
    found: dict[str, str] = {}
    for source in (_json_file(directory / "special_tokens_map.json"), tokenizer_config):
        for name in SPECIAL_TOKEN_NAMES:
            text = _token_text(source.get(name))
            if text is not None:
                found[name] = text
    return found


def _stamp(directory: Path) -> tuple[int, ...]:
    return files_stamp(directory / name for name in TOKENIZER_FILES)


@lru_cache(maxsize=16)
def _load(directory_name: str, stamp: tuple[int, ...]) -> tuple[LocalTokenizer, int | None]:
    directory = Path(directory_name)
    logger.info("loading the tokenizer of %s to check prompts", directory)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    # A prompt is counted whole and alone, as transformers' call without padding or
    # truncation counts it, whatever padding and truncation tokenizer.json was saved with.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tokenizer_config = _json_file(directory / "tokenizer_config.json")
    special = _special_tokens(directory, tokenizer_config)
    known = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    missing = [AddedToken(t, special=True) for t in special.values() if t not in known]
    if missing:
        tokenizer.add_special_tokens(missing)
    prompt_tokenizer = LocalTokenizer(
        tokenizer, _chat_template(directory, tokenizer_config), special
    )
    return prompt_tokenizer, context_length(_json_file(directory / "config.json"))


def local_tokenizer(directory: Path) -> tuple[LocalTokenizer, int | None] | None:
    """(tokenizer, context length) of a local model directory; None when it has no
    tokenizer.json (the worker checks those prompts) or the files cannot be read."""
    if not (directory / "tokenizer.json").exists():
        return None
    try:
        return _load(str(directory.resolve()), _stamp(directory))
    except (OSError, ValueError, jinja2.TemplateError) as exc:
        logger.warning(
            "could not load the tokenizer of %s (%s); prompts not checked", directory, exc
        )
        return None
