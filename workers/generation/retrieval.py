"""Retrieval for generation jobs: the past Q&A pairs most similar to each question go
into the system message before the chat template is applied.

Questions of a chat or prompt_completion dataset are embedded once per (dataset,
embedding model) with a sentence encoder (workers/generation/encoder.py: AutoModel, mean
pooling over the attention mask, L2-normalized) and stored next to the dataset file as
safetensors; later jobs load that file. Similarity is the dot product of normalized
embeddings (cosine).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.datasets import load_dataset_rows
from core.enums import DatasetSchema, FailureType
from core.errors import PermanentJobError
from core.settings import Settings
from core.specs import ChatMessage, GenerateSpec, RetrievalSpec
from db.datasets import get_dataset
from db.session import session_scope
from workers.generation.encoder import Encoder, load_encoder
from workers.model_refs import inside, resolve_model

logger = logging.getLogger(__name__)

EMBED_BATCH = 32
EMBED_MAX_TOKENS = 256
CONTEXT_HEADER = "Answers given to similar questions in the past:"


@dataclass(frozen=True)
class PastAnswer:
    row: int
    question: str
    answer: str


@dataclass(frozen=True)
class Hit:
    past: PastAnswer
    score: float


def past_answers(schema: DatasetSchema, rows: list[dict[str, Any]]) -> list[PastAnswer]:
    """(question, answer) pairs: prompt and completion, or each assistant message with the
    user message just before it; a pair seen before (a repeated training row) is skipped."""
    pairs: list[PastAnswer] = []
    seen: set[tuple[str, str]] = set()

    def add(row: int, question: str, answer: str) -> None:
        if (question, answer) not in seen:
            seen.add((question, answer))
            pairs.append(PastAnswer(row, question, answer))

    for index, row in enumerate(rows):
        if schema is DatasetSchema.PROMPT_COMPLETION:
            add(index, row["prompt"], row["completion"])
            continue
        question: str | None = None
        for message in row["messages"]:
            if message["role"] == "user":
                question = message["content"]
            elif message["role"] == "assistant" and question is not None:
                add(index, question, message["content"])
                question = None
    return pairs


def _embed(encoder: Encoder, texts: list[str]) -> torch.Tensor:
    return encoder.embed(texts, EMBED_BATCH, EMBED_MAX_TOKENS)


def _embeddings_path(dataset_file: Path, model_ref: str, sha256: str) -> Path:
    key = hashlib.blake2b(f"{model_ref}\n{sha256}".encode(), digest_size=8).hexdigest()
    return dataset_file.parent / f"embeddings-{key}.safetensors"


def _save(path: Path, questions: torch.Tensor, model_ref: str) -> None:
    """Written beside the dataset through a temporary file, so it is never half there."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".embeddings-", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"questions": questions.contiguous()}, tmp, metadata={"model": model_ref})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


class RetrievalIndex:
    """The past answers of one dataset and their question embeddings under one encoder."""

    def __init__(self, past: list[PastAnswer], questions: torch.Tensor, encoder: Encoder) -> None:
        self.past = past
        self.questions = questions
        self.encoder = encoder

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        scores = _embed(self.encoder, queries) @ self.questions.T
        top = torch.topk(scores, min(k, len(self.past)), dim=-1)
        return [
            [Hit(self.past[int(i)], float(s)) for s, i in zip(vals, idx, strict=True)]
            for vals, idx in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]


def open_index(
    settings: Settings, retrieval: RetrievalSpec, tenant_id: str | None, device: str
) -> RetrievalIndex:
    with session_scope(settings.database_url, readonly=True) as session:
        ds = get_dataset(session, retrieval.dataset, tenant_id)
        if ds is None:
            raise PermanentJobError(
                f"retrieval dataset {retrieval.dataset!r} no longer exists",
                FailureType.INVALID_SPEC,
            )
        path, fmt, schema, sha256 = ds.path, ds.format, DatasetSchema(ds.schema), ds.sha256
    if schema not in (DatasetSchema.CHAT, DatasetSchema.PROMPT_COMPLETION):
        raise PermanentJobError(
            f"retrieval dataset {retrieval.dataset} holds {schema.value} rows, not Q&A",
            FailureType.INVALID_SPEC,
        )
    dataset_file = inside(settings.data_dir, path)
    past = past_answers(schema, load_dataset_rows(dataset_file, fmt))
    if not past:
        raise PermanentJobError(
            f"retrieval dataset {retrieval.dataset} has no question with an answer",
            FailureType.INVALID_SPEC,
        )
    resolved = resolve_model(settings, retrieval.embedding_model, tenant_id)
    if resolved.adapter_of is not None:
        raise PermanentJobError(
            f"embedding model {retrieval.embedding_model!r} is an adapter; name a full encoder",
            FailureType.INVALID_SPEC,
        )
    encoder = load_encoder(resolved.ref, device)
    stored = _embeddings_path(dataset_file, resolved.ref, sha256)
    questions: torch.Tensor | None = None
    if stored.is_file():
        questions = load_file(str(stored))["questions"]
        if questions.shape[0] != len(past):
            questions = None
    if questions is None:
        logger.info("embedding %d past questions of %s", len(past), retrieval.dataset)
        questions = _embed(encoder, [p.question for p in past])
        _save(stored, questions, resolved.ref)
    return RetrievalIndex(past, questions, encoder)


def context_message(hits: list[Hit]) -> str:
    pairs = "\n\n".join(f"Q: {h.past.question}\nA: {h.past.answer}" for h in hits)
    return f"{CONTEXT_HEADER}\n\n{pairs}"


def _conversations(spec: GenerateSpec) -> list[list[ChatMessage]]:
    if spec.messages is not None:
        return [list(c) for c in spec.messages]
    return [[ChatMessage(role="user", content=p)] for p in spec.prompts or []]


def _question(conversation: list[ChatMessage]) -> str:
    users = [m.content for m in conversation if m.role == "user" and m.content.strip()]
    return users[-1] if users else conversation[-1].content


def with_retrieval(
    settings: Settings, spec: GenerateSpec, tenant_id: str | None, device: str
) -> tuple[GenerateSpec, dict[str, Any]]:
    """The spec with each conversation's system message carrying its top-k past answers,
    and what was retrieved (for the job's events)."""
    if spec.retrieval is None:
        return spec, {}
    index = open_index(settings, spec.retrieval, tenant_id, device)
    conversations = _conversations(spec)
    found = index.search([_question(c) for c in conversations], spec.retrieval.k)
    augmented: list[list[dict[str, str]]] = []
    for conversation, hits in zip(conversations, found, strict=True):
        context = context_message(hits)
        messages = [m.model_dump() for m in conversation]
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{context}"
        else:
            messages.insert(0, {"role": "system", "content": context})
        augmented.append(messages)
    raw = spec.model_dump()
    raw.update(prompts=None, messages=augmented, chat=False, retrieval=None)
    retrieved = [
        [{"row": h.past.row, "question": h.past.question, "score": round(h.score, 4)} for h in hits]
        for hits in found
    ]
    return GenerateSpec.model_validate(raw), {"dataset": spec.retrieval.dataset, "hits": retrieved}
