"""Tiny randomly initialised BERT classifiers and taggers with a WordPiece tokenizer
trained on sentences written here. Saved as safetensors; nothing is downloaded."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

CORPUS = [
    "Ada Lovelace wrote the first program while living in London.",
    "Alan Turing worked at Bletchley Park during the war.",
    "Grace Hopper built a compiler for the Navy in Philadelphia.",
    "The service was quick and the staff were friendly.",
    "My parcel arrived late and the box was damaged.",
    "The hotel room was clean, quiet and good value.",
    "Customer support never answered my emails about the refund.",
    "Marie Curie won two Nobel prizes and lived in Paris.",
    "The new phone from Acme has a bright screen and a weak battery.",
    "We met Linus at the conference in Helsinki last spring.",
] * 10

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MAX_POSITIONS = 512


def tiny_vocab() -> list[str]:
    """The special tokens, every character (alone and as a ##continuation) and every
    lowercased corpus word, in a fixed order: the same ids in every process (a trained
    WordPiece vocabulary breaks frequency ties differently from run to run)."""
    words = {w for line in CORPUS for w in re.findall(r"\w+|[^\w\s]", line.lower())}
    chars = sorted({c for w in words for c in w})
    return SPECIAL_TOKENS + chars + [f"##{c}" for c in chars] + sorted(words - set(chars))


def build_tiny_tokenizer() -> Any:
    """A lowercasing WordPiece tokenizer (BERT layout) as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(tiny_vocab())}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        model_max_length=MAX_POSITIONS,
    )


def _config(vocab_size: int, pad_token_id: int, labels: list[str] | None) -> Any:
    from transformers import BertConfig

    extra: dict[str, Any] = {}
    if labels is not None:
        extra = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
        }
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=pad_token_id,
        **extra,
    )


def _save(model_class: Any, out_dir: Path, labels: list[str] | None, seed: int) -> Path:
    import torch

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    model = model_class(_config(len(tokenizer), tokenizer.pad_token_id, labels))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_bert_classifier(out_dir: Path, labels: list[str], seed: int = 0) -> Path:
    """A 2-layer 32-wide BertForSequenceClassification over `labels`, saved to `out_dir`."""
    from transformers import BertForSequenceClassification

    return _save(BertForSequenceClassification, out_dir, labels, seed)


def build_tiny_bert_tagger(out_dir: Path, tags: list[str], seed: int = 0) -> Path:
    """A 2-layer 32-wide BertForTokenClassification over BIO `tags`, saved to `out_dir`."""
    from transformers import BertForTokenClassification

    return _save(BertForTokenClassification, out_dir, tags, seed)


def build_tiny_bert_base(out_dir: Path, seed: int = 0) -> Path:
    """A headless 2-layer BertModel (what LoRA fine-tuning starts from), saved to `out_dir`."""
    from transformers import BertModel

    return _save(BertModel, out_dir, None, seed)


TINY_ENCODER = "tiny-encoder"


def build_tiny_encoder(out_dir: Path, seed: int = 0) -> Path:
    """A headless 2-layer 32-wide BertModel to embed with (mean pooling), saved to `out_dir`."""
    return build_tiny_bert_base(out_dir, seed)


def reference_embeddings(model_dir: Path, inputs: list[str] | list[list[int]]) -> list[list[float]]:
    """The oracle of embedding tests: each input alone through transformers' AutoModel, its
    last hidden state averaged over all its tokens and L2-normalized; written apart from
    the worker's code (no padding, no batching) so both can be compared."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    out = []
    for item in inputs:
        ids = tokenizer(item)["input_ids"] if isinstance(item, str) else item
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        mean = hidden.mean(dim=0)
        out.append((mean / mean.norm()).tolist())
    return out
