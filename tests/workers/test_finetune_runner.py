"""The fine-tuning runner in-process on tiny models (real Trainer, real peft), with an
in-memory TrainingIO over tmp_path."""

from __future__ import annotations

import errno
import math
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, Trainer, TrainerControl, TrainerState

from core.enums import DatasetSchema, FailureType, FineTuneMethod, FineTuneTask
from core.errors import JobStopped, PermanentJobError, TransientJobError
from core.settings import Settings
from tests.support.memory_io import MemoryTrainingIO, StopAtStep, job_id
from workers.context import RunContext
from workers.model_refs import ResolvedModel
from workers.runners import RunResult
from workers.training.callbacks import CheckpointCallback, StopCallback, metric_points
from workers.training.data import (
    IGNORE_INDEX,
    PaddingCollator,
    encode_chat,
    encode_prompt_completion,
    encode_tagged,
    split_rows,
)
from workers.training.io import CheckpointInfo, MetricPoint
from workers.training.peft_setup import target_modules
from workers.training.runner import FineTuneRunner
from workers.training.throughput import Throughput, ThroughputLog

GPT2 = "tiny-gpt2"
BERT_CLS = "tiny-bert-cls"
BERT_NER = "tiny-bert-ner"
BERT_BASE = "tiny-bert-base"
LM_TEXT = "the cat sat on the mat and the dog sat on the log. "


class RefusedFromStep(MemoryTrainingIO):
    """A TrainingIO whose writes are refused from metrics of `step` on, as DbTrainingIO's
    are once a newer attempt holds the job: dropped, and the attempt told to stop."""

    def __init__(self, base: MemoryTrainingIO, ctx: RunContext, step: int) -> None:
        super().__init__(work_dir=base.work_dir, job_id=base.job_id, datasets=base.datasets)
        self.models = base.models
        self._ctx = ctx
        self._step = step

    def record_metrics(self, points: Sequence[MetricPoint]) -> None:
        if self._ctx.lease_lost or any(p.step >= self._step for p in points):
            self._ctx.lease_lost = True
            self._ctx.stop_event.set()
            return
        super().record_metrics(points)

    def record_checkpoint(self, checkpoint: CheckpointInfo) -> bool:
        if self._ctx.lease_lost:
            raise AssertionError(f"checkpoint {checkpoint.step} saved after the lease was lost")
        return super().record_checkpoint(checkpoint)

    def event(self, message: str, data: dict[str, Any] | None = None) -> None:
        if not self._ctx.lease_lost:
            super().event(message, data)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.support.tiny_encoder import (
        build_tiny_bert_base,
        build_tiny_bert_classifier,
        build_tiny_bert_tagger,
    )

    root = tmp_path_factory.mktemp("encoders")
    return {
        BERT_CLS: build_tiny_bert_classifier(root / BERT_CLS, ["neg", "pos"]),
        BERT_NER: build_tiny_bert_tagger(root / BERT_NER, ["O", "B-PER"]),
        BERT_BASE: build_tiny_bert_base(root / BERT_BASE),
    }


@pytest.fixture
def enc_io(io: MemoryTrainingIO, encoders: dict[str, Path]) -> MemoryTrainingIO:
    for name, path in encoders.items():
        io.models[name] = ResolvedModel(ref=str(path))
    return io


def run(
    io: MemoryTrainingIO,
    ctx: RunContext | None = None,
    hyperparameters: dict[str, Any] | None = None,
    **spec: Any,
) -> RunResult:
    hp = {"batch_size": 4, "learning_rate": 5e-3, "max_steps": 30, "eval_steps": 10}
    merged = {"base_model": GPT2, "task": "causal_lm", **spec}
    merged["hyperparameters"] = {**hp, **(hyperparameters or {})}
    ctx = ctx or RunContext(job_id=io.job_id, attempt=1, device="cpu")
    # one data dir for the jobs of a test (next_job): they share this host's measured throughputs
    return FineTuneRunner(Settings(data_dir=io.work_dir.parent), lambda _: io).run(merged, ctx)


def text_dataset(io: MemoryTrainingIO, rows: int = 40) -> str:
    return io.add_dataset(DatasetSchema.TEXT, [{"text": LM_TEXT * 3}] * rows)


def next_job(io: MemoryTrainingIO) -> str:
    """Makes `io` serve a new job (own id, own work dir); returns the previous job's id."""
    previous = io.job_id
    io.job_id = job_id()
    io.work_dir = io.work_dir.parent / io.job_id
    io.work_dir.mkdir()
    return previous


def started_event(io: MemoryTrainingIO) -> dict[str, Any]:
    data = [d for m, d in io.events if m == "training started"][-1]
    assert data is not None
    return data


def losses(io: MemoryTrainingIO, after: int = 0) -> list[tuple[int, float]]:
    return [(p.step, p.value) for p in io.metrics[after:] if p.name == "train_loss"]


def text_row_tokens(tiny_model_dir: Path) -> int:
    """The tokens a text_dataset row trains on: cut to the default max_length of 128 (the
    tiny tokenizer has no eos); every row is the same, so every batch of 4 holds 4 of them."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return min(len(tokenizer(LM_TEXT * 3)["input_ids"]), 128)


def last_throughput(io: MemoryTrainingIO) -> Throughput | None:
    return ThroughputLog(io.work_dir.parent).last(f"{GPT2} on cpu x1")


# -- causal language modelling ---------------------------------------------------------------


def test_causal_lm_full_learns_and_reports(
    io: MemoryTrainingIO, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ctx = RunContext(job_id=io.job_id, attempt=1, device="cpu")
    result = run(io, ctx, training_dataset=text_dataset(io))

    curve = losses(io)
    assert [step for step, _ in curve] == list(range(1, 31))
    assert curve[-1][1] < curve[0][1] * 0.6
    assert result.result is not None
    assert result.result["task"] == "causal_lm" and result.result["method"] == "full"
    assert result.result["train"]["global_step"] == 30
    assert result.result["train"]["train_samples_per_second"] > 0
    assert result.result["resumed_from_step"] is None
    report = result.result["eval"]
    assert set(report) == {"eval_loss", "perplexity"}
    assert report["perplexity"] == pytest.approx(torch.tensor(report["eval_loss"]).exp().item())

    model = result.trained_model
    assert model is not None and model.task is FineTuneTask.CAUSAL_LM and model.labels == []
    assert model.path == (io.work_dir / "model").resolve()
    files = {p.name for p in model.path.iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert model.metrics["eval_loss"] == report["eval_loss"]
    # the loss falls to the end: the last checkpoint is the best, on the default metric
    best = result.result["best_checkpoint"]
    assert (best["step"], best["metric"]) == (30, "eval_loss")
    assert best["score"] == pytest.approx(report["eval_loss"])

    assert ctx.progress == 1.0
    detail = ctx.detail
    assert detail["step"] == detail["total_steps"] == 30
    assert detail["eta_s"] == 0.0 and detail["loss"] > 0 and detail["samples_per_s"] > 0
    assert io.messages()[0] == "training started"

    trained = 30 * 4 * text_row_tokens(tiny_model_dir)
    assert result.result["trained_tokens"] == detail["trained_tokens"] == trained
    estimate = started_event(io)["estimate"]
    assert (estimate["steps"], estimate["tokens"]) == (30, trained)
    assert estimate["eta_s"] is None and estimate["tokens_per_s"] is None
    assert (
        estimate["eta_basis"]
        == "no ETA: no fine-tune of tiny-gpt2 on cpu x1 has finished on this worker yet"
    )
    measured = last_throughput(io)
    assert measured is not None and (measured.job_id, measured.tokens) == (io.job_id, trained)
    assert measured.tokens_per_s == result.result["train"]["tokens_per_s"] > 0
    assert "evaluation at step 10" in io.messages()
    assert capsys.readouterr().out == ""


def test_packing_trains_to_the_unpacked_loss_and_resumes(io: MemoryTrainingIO) -> None:
    """Short rows, 3 epochs: about 2.5 rows to a packed sequence of 64 tokens, so 3 packed
    sequences a step see about as many rows as 8 plain ones. Epochs stay passes over the
    rows."""
    from tests.support.tiny_model import CORPUS

    rows = [{"text": CORPUS[i % 6]} for i in range(64)]
    data = io.add_dataset(DatasetSchema.TEXT, rows)
    hp: dict[str, Any] = {"max_steps": None, "epochs": 3, "eval_steps": None, "max_length": 64}
    plain = run(io, hyperparameters={**hp, "batch_size": 8}, training_dataset=data)
    next_job(io)
    packing = {**hp, "batch_size": 3, "packing": True}
    with pytest.raises(JobStopped):
        run(io, StopAtStep(io.job_id, step=5), hyperparameters=packing, training_dataset=data)
    ctx = RunContext(job_id=io.job_id, attempt=2, device="cpu")
    packed = run(io, ctx, hyperparameters=packing, training_dataset=data)

    started = started_event(io)
    assert started["train_rows"] == 58  # 64 less the 10% validation split
    sequences = started["packed_sequences"]
    assert 58 / 5 < sequences < 58 / 2 and 0.5 < started["packing_fill"] <= 1
    assert started["total_steps"] == 3 * math.ceil(sequences / 3)
    assert packed.result is not None and plain.result is not None
    assert packed.result["resumed_from_step"] == 5
    assert packed.result["train"]["global_step"] == started["total_steps"]
    assert ctx.progress == 1.0 and ctx.detail["epoch"] == pytest.approx(3.0)
    assert ctx.detail["total_steps"] == started["total_steps"]
    packed_loss = packed.result["eval"]["eval_loss"]
    plain_loss = plain.result["eval"]["eval_loss"]
    assert packed_loss == pytest.approx(plain_loss, rel=0.1)


def test_metrics_are_written_in_batches(io: MemoryTrainingIO) -> None:
    run(io, training_dataset=text_dataset(io))
    names = {p.name for p in io.metrics}
    assert {"train_loss", "learning_rate", "grad_norm", "eval_loss", "eval_perplexity"} <= names
    eval_loss, eval_perplexity = io.metric_values("eval_loss"), io.metric_values("eval_perplexity")
    assert [step for step, _ in eval_perplexity] == [step for step, _ in eval_loss]
    assert eval_perplexity[-1][1] == pytest.approx(math.exp(eval_loss[-1][1]))
    assert not any(name.endswith(("_runtime", "_per_second")) for name in names)
    assert len(io.metric_batches) <= 30 // 4
    assert all(batch for batch in io.metric_batches)
    eval_steps = [p.step for p in io.metrics if p.name == "eval_loss"]
    assert eval_steps == [10, 20, 30]


def test_checkpoints_are_recorded_with_their_steps(io: MemoryTrainingIO) -> None:
    run(io, hyperparameters={"checkpoint_steps": 5}, training_dataset=text_dataset(io))
    recorded = io.recorded_checkpoints
    assert [c.step for c in recorded] == [5, 10, 15, 20, 25, 30]
    assert [c.path.name for c in recorded] == [f"checkpoint-{c.step}" for c in recorded]
    # save_total_limit keeps the newest three directories
    assert sorted(p.name for p in (io.work_dir / "checkpoints").iterdir()) == [
        "checkpoint-20",
        "checkpoint-25",
        "checkpoint-30",
    ]
    assert "eval_loss" in recorded[1].metrics and recorded[0].metrics == {}
    assert "checkpoint at step 30" in io.messages()


def test_causal_lm_lora_trains_an_adapter(io: MemoryTrainingIO) -> None:
    from peft import PeftConfig

    result = run(
        io,
        method="lora",
        hyperparameters={"learning_rate": 3e-2},
        training_dataset=text_dataset(io),
    )
    curve = losses(io)
    # the random model's frozen tied embeddings (std 0.02) cap how far an adapter can move
    # the logits: on this model LoRA gets about 0.2 nats in 30 steps where full gets 3
    assert curve[-1][1] < curve[0][1] - 0.1
    assert result.trained_model is not None
    files = {p.name for p in result.trained_model.path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files
    config: Any = PeftConfig.from_pretrained(str(result.trained_model.path))
    assert set(config.target_modules) == {"c_attn"}
    assert config.fan_in_fan_out is True
    assert result.trained_model.adapter


def test_lora_merged_on_request_saves_a_plain_model(io: MemoryTrainingIO) -> None:
    from transformers import AutoModelForCausalLM

    result = run(
        io,
        method="lora",
        merge_adapter=True,
        hyperparameters={"learning_rate": 3e-2, "max_steps": 5},
        training_dataset=text_dataset(io),
    )
    assert result.trained_model is not None
    assert not result.trained_model.adapter
    files = {p.name for p in result.trained_model.path.iterdir()}
    assert "model.safetensors" in files and "adapter_config.json" not in files
    merged = AutoModelForCausalLM.from_pretrained(
        str(result.trained_model.path), use_safetensors=True
    )
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_adalora_trains_and_reports_plain_eval_loss(io: MemoryTrainingIO) -> None:
    from peft import PeftConfig

    result = run(
        io,
        method="adalora",
        hyperparameters={"learning_rate": 3e-2},
        training_dataset=text_dataset(io),
    )
    assert result.trained_model is not None
    config: Any = PeftConfig.from_pretrained(str(result.trained_model.path))
    assert config.peft_type == "ADALORA" and config.total_step == 30
    curve = losses(io)
    assert curve[-1][1] < curve[0][1]
    # the orthogonality penalty is in the training loss, not in the evaluation loss
    assert result.result is not None
    assert result.result["eval"]["eval_loss"] < curve[-1][1]


def test_lora_targets_default_by_model_type_and_check_requested_names() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.v_proj = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    class Mystery(torch.nn.Module):
        config = SimpleNamespace(model_type="mystery")

        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])

    model = Mystery()
    assert target_modules(model, FineTuneMethod.LORA, None) == ["q_proj", "v_proj"]
    assert target_modules(model, FineTuneMethod.LORA, ["1.v_proj"]) == ["1.v_proj"]
    with pytest.raises(PermanentJobError) as info:
        target_modules(model, FineTuneMethod.LORA, ["c_attn"])
    assert info.value.failure is FailureType.INVALID_SPEC
    assert "q_proj, v_proj" in info.value.message
    model.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
    with pytest.raises(PermanentJobError, match="no default LoRA target modules"):
        target_modules(model, FineTuneMethod.ADALORA, None)


def test_continue_training_a_registered_adapter(io: MemoryTrainingIO, tiny_model_dir: Path) -> None:
    data = text_dataset(io)
    first = run(io, method="lora", hyperparameters={"learning_rate": 3e-2}, training_dataset=data)
    assert first.trained_model is not None and first.result is not None
    io.models["ft:tiny-gpt2:a:1"] = ResolvedModel(
        ref=str(first.trained_model.path), adapter_of=str(tiny_model_dir)
    )
    next_job(io)
    mark = len(io.metrics)
    second = run(
        io,
        base_model="ft:tiny-gpt2:a:1",
        method="lora",
        hyperparameters={"learning_rate": 3e-2, "max_steps": 5},
        training_dataset=data,
    )
    assert second.result is not None and second.result["resumed_from_step"] is None
    # the second run starts where the first one ended, not from the untrained base
    assert losses(io, mark)[0][1] < losses(io)[0][1] - 0.1
    weights = started_event(io)["weights"]
    assert weights.startswith("adapter ") and " /" not in weights  # no server paths in events


def test_prompt_completion_loss_is_on_the_completion_only(
    io: MemoryTrainingIO, tiny_model_dir: Path
) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    prompt, completion = "Write about the blue mug:", " it keeps coffee warm"
    feature = encode_prompt_completion(tok, prompt, completion, max_length=64)
    n_prompt = len(tok(prompt)["input_ids"])
    n_completion = len(tok(completion, add_special_tokens=False)["input_ids"])
    assert feature["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert feature["labels"][n_prompt:] == feature["input_ids"][n_prompt:]
    assert len(feature["input_ids"]) == n_prompt + n_completion  # this tokenizer has no eos

    # too long: the prompt loses its start, the completion keeps at least half the budget
    long = encode_prompt_completion(tok, prompt * 20, completion * 20, max_length=32)
    assert len(long["input_ids"]) == 32
    assert sum(label != IGNORE_INDEX for label in long["labels"]) >= 16

    rows = [{"prompt": "Q: blue mug? A:", "completion": " warm coffee"}] * 24
    result = run(
        io,
        hyperparameters={"max_steps": 6, "eval_steps": 3},
        training_dataset=io.add_dataset(DatasetSchema.PROMPT_COMPLETION, rows),
    )
    assert result.result is not None and result.result["train"]["global_step"] == 6


def test_chat_rows_use_the_template_or_a_role_join(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    plain = encode_chat(tok, messages, max_length=64)
    assert tok.decode(plain["input_ids"]) == "user: hi\nassistant: hello"
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    templated = encode_chat(tok, messages, max_length=64)
    assert tok.decode(templated["input_ids"]) == "<user>hi<assistant>hello"
    pairs = zip(templated["input_ids"], templated["labels"], strict=True)
    learned = [i for i, label in pairs if label != IGNORE_INDEX]
    # a template without a generation prompt: the assistant's turn from its role marker on
    assert tok.decode(learned) == "<assistant>hello"


def test_collator_pads_inputs_masks_and_labels() -> None:
    batch = PaddingCollator(pad_id=7)(
        [
            {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [1, 2, 3]},
            {"input_ids": [4], "attention_mask": [1], "labels": [IGNORE_INDEX]},
        ]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [IGNORE_INDEX] * 3]
    scalar = PaddingCollator(0)([{"input_ids": [1], "labels": 1}, {"input_ids": [2], "labels": 0}])
    assert scalar["labels"].tolist() == [1, 0]


def test_validation_split_is_seeded_and_falls_back_to_a_train_slice(
    io: MemoryTrainingIO,
) -> None:
    rows = [{"text": str(i)} for i in range(20)]
    assert split_rows(rows, 0.25, 1) == split_rows(rows, 0.25, 1)
    train, validation = split_rows(rows, 0.25, 1)
    assert len(validation) == 5 and len(train) == 15
    assert split_rows(rows, 0.25, 2) != (train, validation)

    result = run(
        io,
        validation_split=0.01,
        hyperparameters={"max_steps": 2, "eval_steps": 2},
        training_dataset=text_dataset(io, rows=8),
    )
    assert result.result is not None
    assert any("leaves no rows" in message for message in io.messages())
    assert started_event(io)["validation"] == "train_slice"


# -- classification and tagging ----------------------------------------------------------------

SENTIMENT_WORDS = {
    "neg": ["late", "damaged", "never", "weak", "refund"],
    "pos": ["quick", "friendly", "clean", "quiet", "good"],
}


def sentiment_rows(labels: list[str], n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        text = " ".join(rng.choice(SENTIMENT_WORDS[label]) for _ in range(4))
        rows.append({"text": text, "label": label})
    return rows


def test_sequence_classification_full_learns_separable_labels(
    enc_io: MemoryTrainingIO,
) -> None:
    labels = ["pos", "neg"]  # label ids follow the sorted label names, not row order
    result = run(
        enc_io,
        base_model=BERT_CLS,
        task="sequence_classification",
        training_dataset=enc_io.add_dataset(
            DatasetSchema.CLASSIFICATION, sentiment_rows(labels, 96, seed=1)
        ),
        validation_dataset=enc_io.add_dataset(
            DatasetSchema.CLASSIFICATION, sentiment_rows(labels, 24, seed=2)
        ),
        hyperparameters={"batch_size": 8, "learning_rate": 5e-3, "max_steps": 36, "eval_steps": 12},
    )
    assert result.result is not None and result.trained_model is not None
    report = result.result["eval"]
    assert report["labels"] == ["neg", "pos"]
    assert report["accuracy"] >= 0.9
    assert report["pos"]["support"] == report["neg"]["support"] == 12
    assert result.trained_model.labels == ["neg", "pos"]
    assert result.trained_model.metrics["accuracy"] == report["accuracy"]
    assert "f1_macro" in result.trained_model.metrics
    assert {"eval_accuracy", "eval_f1_macro"} <= {p.name for p in enc_io.metrics}
    config = AutoConfig.from_pretrained(str(result.trained_model.path))
    assert config.id2label == {0: "neg", 1: "pos"}


def test_sequence_classification_lora_gives_a_headless_base_a_trained_head(
    enc_io: MemoryTrainingIO,
) -> None:
    from peft import PeftConfig

    labels = ["neg", "pos"]
    result = run(
        enc_io,
        base_model=BERT_BASE,
        task="sequence_classification",
        method="lora",
        training_dataset=enc_io.add_dataset(
            DatasetSchema.CLASSIFICATION, sentiment_rows(labels, 96, seed=3)
        ),
        validation_split=0.25,
        hyperparameters={"batch_size": 8, "learning_rate": 3e-2, "max_steps": 72, "eval_steps": 24},
    )
    assert result.result is not None and result.trained_model is not None
    assert result.result["eval"]["accuracy"] >= 0.9
    assert result.result["eval"]["pos"]["support"] + result.result["eval"]["neg"]["support"] == 24
    config: Any = PeftConfig.from_pretrained(str(result.trained_model.path))
    assert set(config.target_modules) == {"query", "value"}
    assert "classifier" in config.modules_to_save


def test_word_tags_label_the_first_sub_token_only(encoders: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(str(encoders[BERT_NER]))
    words = ["Zanzibarian", "visited", "Helsinki"]
    feature = encode_tagged(tok, words, [1, 0, 2], max_length=64)
    word_ids = tok(words, is_split_into_words=True).word_ids()
    assert word_ids.count(0) > 1  # a word the tokenizer never saw: several word pieces
    expected, previous = [], None
    for word in word_ids:
        expected.append(IGNORE_INDEX if word is None or word == previous else [1, 0, 2][word])
        previous = word
    assert feature["labels"] == expected
    assert feature["labels"][0] == IGNORE_INDEX and feature["labels"][-1] == IGNORE_INDEX
    assert sorted(x for x in feature["labels"] if x != IGNORE_INDEX) == [0, 1, 2]


def tagged_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    people = [["Ada", "Lovelace"], ["Alan", "Turing"], ["Grace", "Hopper"], ["Marie", "Curie"]]
    places = ["London", "Paris", "Helsinki", "Philadelphia"]
    rows = []
    for _ in range(n):
        person, place = rng.choice(people), rng.choice(places)
        tokens = [*person, "lived", "in", place]
        tags = ["B-PER", "I-PER", "O", "O", "B-LOC"]
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def test_token_classification_full_reports_entities(enc_io: MemoryTrainingIO) -> None:
    result = run(
        enc_io,
        base_model=BERT_NER,
        task="token_classification",
        training_dataset=enc_io.add_dataset(
            DatasetSchema.TOKEN_CLASSIFICATION, tagged_rows(64, seed=1)
        ),
        validation_dataset=enc_io.add_dataset(
            DatasetSchema.TOKEN_CLASSIFICATION, tagged_rows(16, seed=2)
        ),
        hyperparameters={"batch_size": 8, "learning_rate": 5e-3, "max_steps": 32, "eval_steps": 16},
    )
    assert result.result is not None and result.trained_model is not None
    report = result.result["eval"]
    assert {"PER", "LOC", "micro avg", "accuracy"} <= set(report)
    assert report["PER"]["support"] == 16 and report["LOC"]["support"] == 16
    assert report["micro avg"]["f1-score"] >= 0.9
    assert result.trained_model.labels == ["B-LOC", "B-PER", "I-PER", "O"]
    # the stored tagger knew two tags: its head was replaced by one for four
    config = AutoConfig.from_pretrained(str(result.trained_model.path))
    assert config.num_labels == 4 and config.label2id["I-PER"] == 2
    assert "f1_micro" in result.trained_model.metrics
    assert {"eval_f1", "eval_precision"} <= {p.name for p in enc_io.metrics}


# -- stop, resume, start from a checkpoint ------------------------------------------------------


def test_cancel_mid_training_keeps_a_checkpoint(io: MemoryTrainingIO) -> None:
    ctx = StopAtStep(io.job_id, step=7)
    with pytest.raises(JobStopped, match="cancelled"):
        run(io, ctx, training_dataset=text_dataset(io))
    assert [c.step for c in io.recorded_checkpoints] == [7]
    assert (io.work_dir / "checkpoints" / "checkpoint-7" / "model.safetensors").is_file()
    assert not (io.work_dir / "model").exists()
    assert max(step for step, _ in losses(io)) <= 7


@pytest.mark.parametrize("flag", ["cancelled", "paused", "given_back", "timed_out"])
def test_stop_callback_saves_at_the_step_end_then_stops(flag: str) -> None:
    ctx = RunContext(job_id="job_x", attempt=1, device="cpu")
    callback, control, state = StopCallback(ctx), TrainerControl(), TrainerState(global_step=3)
    callback.on_step_end(None, state, control)  # type: ignore[arg-type]
    assert not control.should_training_stop and not control.should_save
    setattr(ctx, flag, True)
    ctx.stop_event.set()
    callback.on_step_end(None, state, control)  # type: ignore[arg-type]
    assert control.should_save and control.should_training_stop
    assert not control.should_evaluate and callback.stopped_at == 3


def test_stop_callback_saves_nothing_once_the_lease_is_lost() -> None:
    ctx = RunContext(job_id="job_x", attempt=1, device="cpu", lease_lost=True)
    ctx.stop_event.set()
    callback, state = StopCallback(ctx), TrainerState(global_step=5)
    control = TrainerControl(should_save=True, should_log=True, should_evaluate=True)
    callback.on_step_end(None, state, control)  # type: ignore[arg-type]
    assert control.should_training_stop
    assert not (control.should_save or control.should_log or control.should_evaluate)
    # lost in the middle of the step (its logged metrics refused): no save after them
    control = TrainerControl(should_save=True, should_evaluate=True)
    StopCallback(ctx).on_log(None, state, control)  # type: ignore[arg-type]
    assert control.should_training_stop and not (control.should_save or control.should_evaluate)


def test_lost_lease_stops_at_once_and_writes_no_checkpoint(io: MemoryTrainingIO) -> None:
    ctx = StopAtStep(io.job_id, step=10, flag="lease_lost")
    with pytest.raises(JobStopped, match="lease lost"):
        run(io, ctx, hyperparameters={"checkpoint_steps": 5}, training_dataset=text_dataset(io))
    # step 10 was a save and an evaluation step: neither happened
    assert [c.step for c in io.recorded_checkpoints] == [5]
    assert sorted(p.name for p in (io.work_dir / "checkpoints").iterdir()) == ["checkpoint-5"]
    assert "evaluation at step 10" not in io.messages()
    assert not (io.work_dir / "model").exists()


def test_refused_write_in_a_step_stops_training_before_its_save(io: MemoryTrainingIO) -> None:
    ctx = RunContext(job_id=io.job_id, attempt=1, device="cpu")
    refusing = RefusedFromStep(io, ctx, step=10)
    with pytest.raises(JobStopped, match="lease lost"):
        run(
            refusing,
            ctx,
            hyperparameters={"checkpoint_steps": 5},
            training_dataset=text_dataset(refusing),
        )
    assert [c.step for c in refusing.recorded_checkpoints] == [5]
    assert sorted(p.name for p in (io.work_dir / "checkpoints").iterdir()) == ["checkpoint-5"]
    assert max(p.step for p in refusing.metrics) < 10
    assert not (io.work_dir / "model").exists()


class UnwritableAtClose(MemoryTrainingIO):
    """A TrainingIO whose buffered records cannot be written when the run ends, as
    DbTrainingIO's close once the database has been away longer than db_retry_s."""

    def __init__(self, base: MemoryTrainingIO) -> None:
        super().__init__(work_dir=base.work_dir, job_id=base.job_id, datasets=base.datasets)
        self.models = base.models

    def close(self) -> None:
        raise TransientJobError("database unreachable", FailureType.DATABASE_UNAVAILABLE)


def test_records_unwritable_at_the_end_leave_no_saved_model(io: MemoryTrainingIO) -> None:
    unwritable = UnwritableAtClose(io)
    with pytest.raises(TransientJobError, match="database unreachable"):
        run(unwritable, training_dataset=text_dataset(unwritable))
    # trained to the end and saved, but no row will ever name that model: it is removed
    assert max(p.step for p in unwritable.metrics) == 30
    assert not (io.work_dir / "model").exists()


def test_resume_continues_from_the_latest_checkpoint(
    io: MemoryTrainingIO, tiny_model_dir: Path
) -> None:
    data = text_dataset(io)
    with pytest.raises(JobStopped):
        run(io, StopAtStep(io.job_id, step=12), training_dataset=data)
    assert io.latest_checkpoint() is not None
    assert last_throughput(io) is None  # a stopped attempt measures nothing
    mark = len(io.metrics)

    result = run(io, training_dataset=data)  # the job claimed again after its worker died
    assert result.result is not None
    assert result.result["resumed_from_step"] == 12
    assert result.result["train"]["global_step"] == 30
    resumed = losses(io, mark)
    assert resumed[0][0] > 12 and resumed[-1][0] == 30
    assert "resuming from step 12" in io.messages()
    assert [c.step for c in io.recorded_checkpoints] == [10, 12, 20, 30]
    # steps 1-12 counted by the first attempt (kept in checkpoint-12), 13-30 by this one
    row = text_row_tokens(tiny_model_dir)
    assert result.result["trained_tokens"] == 30 * 4 * row
    measured = last_throughput(io)
    assert measured is not None and measured.tokens == 18 * 4 * row


def test_checkpoint_that_runs_out_of_space_leaves_the_last_good_one(
    io: MemoryTrainingIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = text_dataset(io)
    original = Trainer._save_rng_state
    saves = []

    def disk_full_on_second_save(self: Trainer, output_dir: str) -> None:
        saves.append(output_dir)
        if len(saves) == 2:
            (Path(output_dir) / "rng_state.pth").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", disk_full_on_second_save)
    with pytest.raises(TransientJobError, match="last good checkpoint is step 10") as failed:
        run(io, training_dataset=data)
    assert failed.value.failure is FailureType.DISK_FULL
    assert ".staging" in saves[1]  # written aside, never as checkpoint-20
    checkpoints = io.work_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-10"]
    assert (checkpoints / "checkpoint-10" / "trainer_state.json").is_file()

    monkeypatch.undo()
    result = run(io, training_dataset=data)  # the retry
    assert result.result is not None
    assert result.result["resumed_from_step"] == 10
    assert 0 < result.result["steps_redone"] <= 10
    steps = [step for step, _ in losses(io)]
    assert steps == sorted(set(steps)), "metrics of redone steps are written once"
    assert io.closed


def test_from_checkpoint_starts_from_another_jobs_weights(
    io: MemoryTrainingIO, tiny_model_dir: Path
) -> None:
    data = text_dataset(io)
    run(io, training_dataset=data)
    first_curve = losses(io)
    mark = len(io.metrics)

    first_job = next_job(io)
    first_throughput = last_throughput(io)
    assert first_throughput is not None and first_throughput.job_id == first_job
    run(
        io,
        from_checkpoint={"job_id": first_job, "step": 20},
        hyperparameters={"max_steps": 3},
        training_dataset=data,
    )
    # fresh optimizer, but the weights are those of step 20
    assert losses(io, mark)[0][1] < first_curve[0][1] * 0.7
    started = started_event(io)
    weights = started["weights"]
    assert "checkpoint-20" in weights and " /" not in weights
    # the ETA of the second fine-tune of tiny-gpt2 here, at the throughput the first one measured
    estimate = started["estimate"]
    assert estimate["tokens_per_s"] == first_throughput.tokens_per_s
    assert estimate["tokens"] == 3 * 4 * text_row_tokens(tiny_model_dir)
    assert estimate["eta_s"] == round(estimate["tokens"] / first_throughput.tokens_per_s, 1)
    assert first_job in estimate["eta_basis"]


def test_early_stopping_ends_training_and_keeps_the_best(io: MemoryTrainingIO) -> None:
    result = run(
        io,
        early_stopping={"patience": 1, "threshold": 100.0},
        hyperparameters={"eval_steps": 2, "checkpoint_steps": 3},
        training_dataset=text_dataset(io),
    )
    assert result.result is not None
    # no evaluation can improve by 100, so the second one ends training
    assert result.result["train"]["global_step"] == 4
    # a checkpoint at each evaluation (either may be the best) and every checkpoint_steps
    assert [c.step for c in io.recorded_checkpoints] == [2, 3, 4]
    # the loss still fell a little: the best is the second evaluation, on the default metric
    best = result.result["best_checkpoint"]
    assert (best["step"], best["metric"]) == (4, "eval_loss")
    assert best["score"] == pytest.approx(result.result["eval"]["eval_loss"])


def test_checkpoint_minutes_ask_for_a_save() -> None:
    now = [0.0]
    io = MemoryTrainingIO(work_dir=Path("/nonexistent"))
    callback = CheckpointCallback(io, every_s=60.0, clock=lambda: now[0])
    control, state = TrainerControl(), TrainerState()
    callback.on_train_begin(None, state, control)  # type: ignore[arg-type]
    now[0] = 59.0
    callback.on_step_end(None, state, control)  # type: ignore[arg-type]
    assert not control.should_save
    now[0] = 61.0
    callback.on_step_end(None, state, control)  # type: ignore[arg-type]
    assert control.should_save


def test_metric_points_from_trainer_logs() -> None:
    points = metric_points(
        {"loss": 2.0, "grad_norm": 1.5, "learning_rate": 1e-3, "epoch": 0.5}, step=3
    )
    assert [(p.name, p.value, p.step, p.epoch) for p in points] == [
        ("train_loss", 2.0, 3, 0.5),
        ("grad_norm", 1.5, 3, 0.5),
        ("learning_rate", 1e-3, 3, 0.5),
    ]
    evaluation = metric_points({"eval_loss": 1.0, "eval_runtime": 0.2, "epoch": 1.0}, step=9)
    assert [p.name for p in evaluation] == ["eval_loss"]
    assert metric_points({"train_runtime": 3.0, "train_loss": 2.0}, step=9) == []
    # the token count and the session's throughput that Trainer adds to a step's log are no points
    counted = {"loss": 2.0, "num_input_tokens_seen": 96, "train_runtime": 1.0, "epoch": 0.5}
    assert [p.name for p in metric_points({**counted, "train_tokens_per_second": 96.0}, 3)] == [
        "train_loss"
    ]


# -- failures ------------------------------------------------------------------------------------


def test_schema_that_does_not_fit_the_task_is_invalid(io: MemoryTrainingIO) -> None:
    data = text_dataset(io)
    with pytest.raises(PermanentJobError) as info:
        run(io, task="sequence_classification", training_dataset=data)
    assert info.value.failure is FailureType.INVALID_SPEC
    assert data in info.value.message and "'text'" in info.value.message


def test_validation_labels_missing_from_train_are_invalid(io: MemoryTrainingIO) -> None:
    train = io.add_dataset(
        DatasetSchema.CLASSIFICATION, [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}]
    )
    validation = io.add_dataset(
        DatasetSchema.CLASSIFICATION,
        [
            {"text": "c", "label": "meh"},
            {"text": "d", "label": "pos"},
            {"text": "e", "label": "zz"},
        ],
    )
    with pytest.raises(PermanentJobError) as info:
        run(
            io,
            task="sequence_classification",
            training_dataset=train,
            validation_dataset=validation,
        )
    assert info.value.failure is FailureType.INVALID_SPEC
    assert "meh, zz" in info.value.message and validation in info.value.message


def test_model_without_safetensors_is_not_found(
    io: MemoryTrainingIO, tiny_model_dir: Path, tmp_path: Path
) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    io.models["pickled"] = ResolvedModel(ref=str(pickled))
    with pytest.raises(PermanentJobError) as info:
        run(io, base_model="pickled", training_dataset=text_dataset(io))
    assert info.value.failure is FailureType.MODEL_NOT_FOUND
    assert "no safetensors" in info.value.message and "pytorch_model.bin" in info.value.message


def test_unknown_model_is_not_found(io: MemoryTrainingIO) -> None:
    with pytest.raises(PermanentJobError) as info:
        run(io, base_model="no-such-org/no-such-model", training_dataset=text_dataset(io))
    assert info.value.failure is FailureType.MODEL_NOT_FOUND


def test_out_of_memory_is_a_typed_failure(
    io: MemoryTrainingIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exhausted(self: Trainer, **kwargs: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Trainer, "train", exhausted)
    with pytest.raises(PermanentJobError) as info:
        run(io, training_dataset=text_dataset(io))
    assert info.value.failure is FailureType.OUT_OF_MEMORY
    assert "20.00 GiB" in info.value.message


def test_throughputs_are_kept_per_setup_and_a_broken_file_is_replaced(tmp_path: Path) -> None:
    log = ThroughputLog(tmp_path, host="gpu-7")
    assert log.path == tmp_path / "throughput" / "gpu-7.json"
    log.path.parent.mkdir()
    log.path.write_text("{not json")
    assert log.last("m on cpu x1") is None
    first = Throughput(10.0, 100, 10.0, "job_a", "full", "2026-12-06T00:00:00+00:00")
    second = Throughput(40.0, 400, 10.0, "job_b", "lora", "2026-12-06T01:00:00+00:00")
    log.record("m on cpu x1", first)
    log.record("m on cuda x2", second)
    assert (log.last("m on cpu x1"), log.last("m on cuda x2")) == (first, second)
    log.record("m on cpu x1", second)
    assert log.last("m on cpu x1") == second
