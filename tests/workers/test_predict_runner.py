"""The predict runner in-process on tiny BERT classifiers, taggers and a LoRA adapter."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    pipeline,
)

from core.enums import DatasetSchema, FailureType
from core.errors import JobStopped, PermanentJobError
from core.settings import Settings
from db.outputs import OutputRecord
from tests.support.tiny_encoder import (
    build_tiny_bert_base,
    build_tiny_bert_classifier,
    build_tiny_bert_tagger,
)
from workers.context import RunContext
from workers.runners import RunResult
from workers.training.io import (
    CheckpointInfo,
    DatasetRows,
    MetricPoint,
    ResolvedModel,
    TrainingIO,
)
from workers.training.predict import PredictRunner, group_entities

LABELS = ["negative", "neutral", "positive"]
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
TEXTS = [
    "The service was quick and the staff were friendly.",
    "My parcel arrived late and the box was damaged.",
    "Customer support never answered my emails.",
    "Fine.",
    "The hotel room was clean, quiet and good value, and the breakfast was excellent too.",
]
SENTENCES = [
    "Ada Lovelace wrote the first program while living in London.",
    "Marie Curie won two Nobel prizes and lived in Paris.",
    "We met Linus at the conference in Helsinki last spring.",
]
CLASSIFIER, TAGGER, ADAPTER, GPT2 = "tiny-classifier", "tiny-tagger", "tiny-lora", "tiny-gpt2"
CLASSIFICATION_DS = "ds_" + "1" * 32
TOKENS_DS = "ds_" + "2" * 32
CHAT_DS = "ds_" + "3" * 32


class MemoryIO:
    """TrainingIO over dicts: models by name, datasets by id; records events."""

    def __init__(
        self, work_dir: Path, models: dict[str, ResolvedModel], datasets: dict[str, DatasetRows]
    ) -> None:
        self.work_dir = work_dir
        self._models = models
        self._datasets = datasets
        self.events: list[tuple[str, dict[str, Any] | None]] = []

    def dataset(self, dataset_id: str) -> DatasetRows:
        if dataset_id not in self._datasets:
            raise PermanentJobError(f"no dataset {dataset_id}", FailureType.INVALID_SPEC)
        return self._datasets[dataset_id]

    def resolve_model(self, ref: str) -> ResolvedModel:
        return self._models.get(ref, ResolvedModel(ref=ref))

    def record_metrics(self, points: Sequence[MetricPoint]) -> None:
        raise AssertionError("prediction records no metrics")

    def record_checkpoint(self, checkpoint: CheckpointInfo) -> bool:
        raise AssertionError("prediction writes no checkpoints")

    def latest_checkpoint(self) -> CheckpointInfo | None:
        return None

    def checkpoint_of(self, job_id: str, step: int | None) -> CheckpointInfo:
        raise PermanentJobError(f"no checkpoint of {job_id}", FailureType.INVALID_SPEC)

    def event(self, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((message, data))


class RecordingContext(RunContext):
    """Records every progress report; can set the stop flag after the n-th one."""

    def __init__(self, stop_after: int | None = None) -> None:
        super().__init__(job_id="job_predict", attempt=1, device="cpu")
        self.reports: list[tuple[float, dict[str, Any]]] = []
        self._stop_after = stop_after

    def report_progress(self, fraction: float, **detail: Any) -> None:
        super().report_progress(fraction, **detail)
        self.reports.append((fraction, detail))
        if self._stop_after is not None and len(self.reports) >= self._stop_after:
            self.cancelled = True
            self.stop_event.set()


def lora_adapter(base_dir: Path, out_dir: Path, texts: list[str]) -> torch.Tensor:
    """A SEQ_CLS LoRA adapter (non-zero LoRA weights, trained-looking head) over the
    headless base; returns the adapted model's probabilities on `texts`."""
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(1)
    base = AutoModelForSequenceClassification.from_pretrained(
        str(base_dir),
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
        use_safetensors=True,
    )
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        init_lora_weights=False,
    )
    with warnings.catch_warnings():
        # peft 0.21 reads `model.is_gradient_checkpointing`, which transformers 5 deprecates
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        model = get_peft_model(base, config)
    model.eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    with torch.inference_mode():
        logits = model(**tok(texts, padding=True, return_tensors="pt")).logits
    return torch.softmax(logits, dim=-1)


@pytest.fixture(scope="module")
def models(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> dict[str, ResolvedModel]:
    root = tmp_path_factory.mktemp("encoders")
    base = build_tiny_bert_base(root / "base")
    return {
        CLASSIFIER: ResolvedModel(ref=str(build_tiny_bert_classifier(root / "cls", LABELS))),
        TAGGER: ResolvedModel(ref=str(build_tiny_bert_tagger(root / "tag", TAGS))),
        ADAPTER: ResolvedModel(ref=str(root / "lora"), labels=list(LABELS), adapter_of=str(base)),
        GPT2: ResolvedModel(ref=str(tiny_model_dir)),
    }


@pytest.fixture(scope="module")
def adapter_probs(models: dict[str, ResolvedModel]) -> torch.Tensor:
    adapter = models[ADAPTER]
    assert adapter.adapter_of is not None
    return lora_adapter(Path(adapter.adapter_of), Path(adapter.ref), TEXTS)


@pytest.fixture()
def io(tmp_path: Path, models: dict[str, ResolvedModel]) -> MemoryIO:
    datasets = {
        CLASSIFICATION_DS: DatasetRows(
            id=CLASSIFICATION_DS,
            schema=DatasetSchema.CLASSIFICATION,
            rows=[{"text": t, "label": "neutral"} for t in TEXTS],
            labels=list(LABELS),
        ),
        TOKENS_DS: DatasetRows(
            id=TOKENS_DS,
            schema=DatasetSchema.TOKEN_CLASSIFICATION,
            rows=[{"tokens": s.split(" "), "tags": ["O"] * len(s.split(" "))} for s in SENTENCES],
            labels=list(TAGS),
        ),
        CHAT_DS: DatasetRows(
            id=CHAT_DS,
            schema=DatasetSchema.CHAT,
            rows=[{"messages": [{"role": "user", "content": "hi"}]}],
        ),
    }
    return MemoryIO(tmp_path, models, datasets)


def predict(
    io: MemoryIO, ctx: RunContext | None = None, **spec: Any
) -> tuple[RunResult, RunContext]:
    ctx = ctx or RecordingContext()
    io_for_ctx: TrainingIO = io
    runner = PredictRunner(Settings(data_dir=io.work_dir), lambda _: io_for_ctx)
    return runner.run(spec, ctx), ctx


def failure_of(io: MemoryIO, **spec: Any) -> PermanentJobError:
    with pytest.raises(PermanentJobError) as info:
        predict(io, **spec)
    return info.value


def direct_probs(model_dir: str, texts: list[str]) -> torch.Tensor:
    """Each text alone (no padding) through the saved model."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)
    model.eval()
    with torch.inference_mode():
        return torch.cat(
            [torch.softmax(model(**tok(t, return_tensors="pt")).logits, -1) for t in texts]
        )


def test_classifier_labels_every_text_in_order(
    io: MemoryIO, models: dict[str, ResolvedModel]
) -> None:
    result, ctx = predict(io, model=CLASSIFIER, texts=TEXTS, batch_size=2)
    outs = result.outputs
    assert [(o.prompt_index, o.sequence_index) for o in outs] == [(i, 0) for i in range(len(TEXTS))]
    tok = AutoTokenizer.from_pretrained(models[CLASSIFIER].ref)
    expected = direct_probs(models[CLASSIFIER].ref, TEXTS)
    for out, text, probs in zip(outs, TEXTS, expected, strict=True):
        assert out.data is not None
        assert out.text == out.data["label"] and out.text in LABELS
        assert list(out.data["scores"]) == LABELS
        assert sum(out.data["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert out.data["score"] == max(out.data["scores"].values())
        # padding inside a batch changes nothing
        assert list(out.data["scores"].values()) == pytest.approx(probs.tolist(), abs=1e-5)
        assert out.finish_reason == "prediction"
        assert out.prompt_tokens == len(tok(text)["input_ids"])
        assert out.completion_tokens == 0
    assert result.result is not None
    assert result.result["task"] == "sequence_classification"
    assert result.result["count"] == len(TEXTS)
    counts = result.result["label_counts"]
    assert list(counts) == LABELS and sum(counts.values()) == len(TEXTS)
    assert isinstance(ctx, RecordingContext)
    assert [fraction for fraction, _ in ctx.reports] == pytest.approx([0.4, 0.8, 1.0])
    assert ctx.detail == {"done": 5, "total": 5}


def test_registered_labels_name_the_outputs(io: MemoryIO, models: dict[str, ResolvedModel]) -> None:
    renamed = ["bad", "meh", "good"]
    io._models["renamed"] = ResolvedModel(ref=models[CLASSIFIER].ref, labels=renamed)
    outs = predict(io, model="renamed", texts=TEXTS[:2])[0].outputs
    assert all(o.text in renamed and o.data and list(o.data["scores"]) == renamed for o in outs)
    io._models["wrong"] = ResolvedModel(ref=models[CLASSIFIER].ref, labels=["a", "b"])
    error = failure_of(io, model="wrong", texts=["x"])
    assert error.failure is FailureType.INVALID_SPEC
    assert "3 outputs but 2 registered labels" in error.message


def entities_of(out: OutputRecord) -> list[dict[str, Any]]:
    assert out.data is not None
    entities: list[dict[str, Any]] = out.data["entities"]
    return entities


def test_tagger_entities_slice_the_text_like_the_pipeline(
    io: MemoryIO, models: dict[str, ResolvedModel]
) -> None:
    result, _ = predict(io, model=TAGGER, texts=SENTENCES, batch_size=2)
    reference = pipeline(
        "token-classification",
        model=models[TAGGER].ref,
        aggregation_strategy="simple",
        device="cpu",
    )
    total = 0
    for out, text in zip(result.outputs, SENTENCES, strict=True):
        entities = entities_of(out)
        total += len(entities)
        for e in entities:
            assert 0 <= e["start"] < e["end"] <= len(text)
            assert e["text"] == text[e["start"] : e["end"]]
            assert e["type"] in {"PER", "LOC"}
            assert 0.0 < e["score"] <= 1.0
        assert out.text == "; ".join(f"{e['type']}:{e['text']}" for e in entities)
        expected = reference(text)
        assert [(e["type"], e["start"], e["end"]) for e in entities] == [
            (g["entity_group"], g["start"], g["end"]) for g in expected
        ]
        assert [e["score"] for e in entities] == pytest.approx(
            [float(g["score"]) for g in expected], abs=1e-5
        )
    assert total > 0  # the random tagger does find some, so the checks above ran
    assert result.result is not None
    assert result.result["task"] == "token_classification"
    assert list(result.result["label_counts"]) == ["LOC", "PER"]
    assert sum(result.result["label_counts"].values()) == total


def test_long_texts_are_truncated_to_max_length(
    io: MemoryIO, models: dict[str, ResolvedModel]
) -> None:
    long_text = " ".join(SENTENCES * 5)
    out = predict(io, model=TAGGER, texts=[long_text], max_length=16)[0].outputs[0]
    assert out.prompt_tokens == 16
    tok = AutoTokenizer.from_pretrained(models[TAGGER].ref)
    kept = tok(long_text, truncation=True, max_length=16, return_offsets_mapping=True)
    covered = max(end for _, end in kept["offset_mapping"])
    assert covered < len(long_text)
    assert all(e["end"] <= covered for e in entities_of(out))


def test_group_entities_like_simple_aggregation() -> None:
    text = "Ada Lovelace met Bob in New York"
    tokens = [
        ("B-PER", 0.9, 0, 3),
        ("I-PER", 0.7, 4, 12),
        ("O", 0.8, 13, 16),
        ("B-PER", 0.6, 17, 20),
        ("O", 0.9, 21, 23),
        ("I-LOC", 0.5, 24, 27),  # an I- without a B- still opens an entity
        ("I-LOC", 0.7, 28, 32),
    ]
    assert group_entities(text, tokens) == [
        {"type": "PER", "start": 0, "end": 12, "text": "Ada Lovelace", "score": pytest.approx(0.8)},
        {"type": "PER", "start": 17, "end": 20, "text": "Bob", "score": 0.6},
        {"type": "LOC", "start": 24, "end": 32, "text": "New York", "score": pytest.approx(0.6)},
    ]
    # B- right after the same type starts a second entity
    split = group_entities("Ada Bob", [("B-PER", 1.0, 0, 3), ("B-PER", 1.0, 4, 7)])
    assert [e["text"] for e in split] == ["Ada", "Bob"]


def test_dataset_texts_and_tokens_are_read(io: MemoryIO) -> None:
    from_dataset = predict(io, model=CLASSIFIER, dataset=CLASSIFICATION_DS)[0].outputs
    from_texts = predict(io, model=CLASSIFIER, texts=TEXTS)[0].outputs
    assert from_dataset == from_texts
    # token rows are joined with spaces, so offsets index the joined sentence
    tagged = predict(io, model=TAGGER, dataset=TOKENS_DS)[0].outputs
    assert tagged == predict(io, model=TAGGER, texts=SENTENCES)[0].outputs
    error = failure_of(io, model=CLASSIFIER, dataset=CHAT_DS)
    assert error.failure is FailureType.INVALID_SPEC
    assert "chat" in error.message


def test_stop_event_raises_job_stopped(io: MemoryIO) -> None:
    ctx = RecordingContext()
    ctx.cancelled = True
    ctx.stop_event.set()
    with pytest.raises(JobStopped, match="cancelled"):
        predict(io, ctx, model=CLASSIFIER, texts=TEXTS)
    # a stop seen after the first batch ends the run before the second
    ctx = RecordingContext(stop_after=1)
    with pytest.raises(JobStopped):
        predict(io, ctx, model=CLASSIFIER, texts=TEXTS, batch_size=2)
    assert [fraction for fraction, _ in ctx.reports] == [pytest.approx(0.4)]


def test_unknown_model_is_model_not_found(io: MemoryIO) -> None:
    for ref in ["no-such-model", "nobody/no-such-model"]:
        error = failure_of(io, model=ref, texts=["hello"])
        assert error.failure is FailureType.MODEL_NOT_FOUND
        assert "cannot load model" in error.message


def test_causal_lm_is_invalid_spec(io: MemoryIO) -> None:
    error = failure_of(io, model=GPT2, texts=["hello"])
    assert error.failure is FailureType.INVALID_SPEC
    assert "GPT2LMHeadModel" in error.message
    assert "ForSequenceClassification" in error.message


def test_bad_spec_is_invalid_spec(io: MemoryIO) -> None:
    error = failure_of(io, model=CLASSIFIER, texts=["x"], dataset=CLASSIFICATION_DS)
    assert error.failure is FailureType.INVALID_SPEC


def test_lora_adapter_applies_on_its_base(io: MemoryIO, adapter_probs: torch.Tensor) -> None:
    result, _ = predict(io, model=ADAPTER, texts=TEXTS, batch_size=3)
    assert result.result is not None
    assert result.result["task"] == "sequence_classification"
    for out, probs in zip(result.outputs, adapter_probs, strict=True):
        assert out.data is not None and out.text in LABELS
        assert sum(out.data["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        # the merged model reproduces the adapted model, head included
        assert list(out.data["scores"].values()) == pytest.approx(probs.tolist(), abs=1e-5)
