"""A tiny GPT-2 and a byte-level BPE tokenizer trained on text written here."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The blue mug keeps coffee warm for hours and looks good on any desk.",
    "Thank you for your patience; your parcel is on its way and will arrive soon.",
    "Fresh bread every morning at the corner bakery, baked with love.",
    "Our support team answers every question within one business day.",
    "Write a short product description for a pair of running shoes.",
    "The quarterly report shows steady growth in every region we serve.",
] * 20


def build_tiny_gpt2(out_dir: Path, n_positions: int = 4096) -> Path:
    """Save a randomly initialised 2-layer GPT-2 with a trained tokenizer to `out_dir`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    config = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = fast.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    fast.save_pretrained(out_dir)
    return out_dir


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def with_chat_template(model_dir: Path, out_dir: Path, template: str = CHAT_TEMPLATE) -> Path:
    """A copy of `model_dir` at `out_dir` whose tokenizer has a chat template (a simple
    one unless `template` is given)."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out_dir)
    return out_dir
