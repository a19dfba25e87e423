"""Checks on a job request that need the database: referenced datasets, models, checkpoints.

They run before the job row is inserted, so a request that names something
missing or unfit gets a 422 naming it and creates nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import llguidance
from sqlalchemy.orm import Session

from api.tokenizers import local_tokenizer
from core.embeddings import input_limit
from core.enums import (
    COMPLETION_SCHEMAS,
    DatasetSchema,
    FineTuneObjective,
    FineTuneTask,
    PredictMode,
    Tracker,
    training_schemas,
)
from core.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    ModelNotInstalledError,
    QuotaExceededError,
    UnsupportedParameterError,
)
from core.model_files import CODE_CONFIGS, custom_code_reason, files_stamp
from core.model_sources import hub_allowed, into_tenant_files, not_installed
from core.prompts import PromptError, encode_prompts, vocabulary_error
from core.ranking import rank_label
from core.response_format import JSON_GRAMMAR_OPTIONS
from core.settings import Settings
from core.specs import (
    MODEL_REF_PATTERN,
    AnyJobRequest,
    BatchJobRequest,
    BatchSpec,
    EmbedJobRequest,
    EmbedSpec,
    FineTuneJobRequest,
    FineTuneSpec,
    GenerateJobRequest,
    GenerateSpec,
    PredictJobRequest,
    PredictSpec,
    RetrievalSpec,
)
from core.storage import artifact_store
from core.webhooks import check_destination
from db.datasets import get_dataset
from db.jobs import count_queued, get_job
from db.models import MODEL_NAME_LENGTH, Dataset, new_job_id
from db.registry import get_model, is_registry_name, model_name, serving_base
from db.tenants import lock_queued_quota
from db.training import list_checkpoints
from db.webhooks import signing_secrets

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

CLASSIFIER_TASKS = frozenset(
    {FineTuneTask.SEQUENCE_CLASSIFICATION.value, FineTuneTask.TOKEN_CLASSIFICATION.value}
)


def _dataset(session: Session, tenant_id: str, dataset_id: str, param: str) -> Dataset:
    ds = get_dataset(session, dataset_id, tenant_id)
    if ds is None:
        raise InvalidRequestError(f"dataset {dataset_id!r} does not exist", param=param)
    return ds


def check_model(
    session: Session,
    settings: Settings,
    tenant_id: str,
    ref: str,
    param: str,
    tasks: frozenset[str] | None,
) -> None:
    """A registry name must exist (with a fitting task); a local model dir must hold safetensors."""
    if is_registry_name(ref):
        model = get_model(session, ref, tenant_id)
        if model is None:
            raise InvalidRequestError(f"model {ref!r} is not in the registry", param=param)
        if tasks is not None and model.task not in tasks:
            raise InvalidRequestError(
                f"model {ref!r} is a {model.task} model; this job needs {', '.join(sorted(tasks))}",
                param=param,
            )
        return
    if into_tenant_files(settings, ref):
        raise ModelNotInstalledError(
            f"model {ref!r} is a path into the data dir: a fine-tuned model is named by its "
            "registry name (ft:...), a base model by its directory under models/",
            param=param,
        )
    local = settings.models_dir / ref
    if not local.is_dir():
        # Without shared storage this host sees every installed model; with it, the model
        # may be in the store only, and the worker refuses it at once if it is not.
        if not settings.storage_url and not Path(ref).is_dir() and not hub_allowed(settings, ref):
            raise ModelNotInstalledError(not_installed(settings, ref), param=param)
        return
    # the directory's own mtime: weights or code files added or removed; the configs':
    # an auto_map written into one in place
    stamp = files_stamp((local, *(local / name for name in CODE_CONFIGS)))
    refusal = _directory_refusal(str(local), stamp)
    if refusal is not None:
        raise InvalidRequestError(f"model directory {ref!r} {refusal}", param=param)


@lru_cache(maxsize=64)
def _directory_refusal(directory: str, stamp: tuple[int, ...]) -> str | None:
    """Why a local model directory is refused (no safetensors weights, custom code), read
    once per `stamp`: a burst of requests on one model lists and parses it once."""
    local = Path(directory)
    if not any(local.glob("*.safetensors")):
        return "has no safetensors weights (only safetensors are loaded)"
    reason = custom_code_reason(local)
    if reason is not None:
        return f"is refused: {reason} (trust_remote_code stays off)"
    return None


def _fitting_dataset(
    session: Session, tenant_id: str, dataset_id: str, spec: FineTuneSpec, param: str
) -> Dataset:
    allowed = training_schemas(spec.task, spec.objective)
    ds = _dataset(session, tenant_id, dataset_id, param)
    if DatasetSchema(ds.schema) not in allowed:
        trains = (
            f"task {spec.task.value}"
            if spec.objective is FineTuneObjective.SUPERVISED
            else f"objective {spec.objective.value}"
        )
        raise InvalidRequestError(
            f"dataset {ds.id!r} holds {ds.schema} rows; {trains} needs "
            f"{' or '.join(sorted(s.value for s in allowed))}",
            param=param,
        )
    if spec.reinforcement is not None:
        _check_item_fields(ds, spec.reinforcement.grader.item_fields)
    return ds


def _check_item_fields(ds: Dataset, fields: set[str]) -> None:
    """Every `{{item.<field>}}` the grader names must be a field of every row of the
    dataset (the upload recorded which fields every row has)."""
    missing = sorted(fields - set(ds.report.get("item_fields", [])))
    if missing:
        named = ", ".join(f"{{{{item.{name}}}}}" for name in missing)
        raise InvalidRequestError(
            f"the grader names {named}, but not every row of dataset {ds.id!r} has "
            f"{'that field' if len(missing) == 1 else 'those fields'} (every row was checked "
            "at upload; its report's item_fields lists the fields all rows have)",
            param="spec.reinforcement.grader",
        )


def _check_finetune(
    session: Session, settings: Settings, tenant_id: str, spec: FineTuneSpec
) -> None:
    tracking = spec.tracking or []
    if Tracker.MLFLOW in tracking and not settings.mlflow_tracking_uri.get_secret_value():
        raise InvalidRequestError(
            "this deployment has no MLflow tracking server (MODELYARD_MLFLOW_TRACKING_URI)",
            param="spec.tracking",
        )
    train = _fitting_dataset(
        session, tenant_id, spec.training_dataset, spec, "spec.training_dataset"
    )
    if spec.validation_dataset is not None:
        val = _fitting_dataset(
            session, tenant_id, spec.validation_dataset, spec, "spec.validation_dataset"
        )
        missing = sorted(set(val.labels) - set(train.labels))
        if spec.task is not FineTuneTask.CAUSAL_LM and missing:
            raise InvalidRequestError(
                f"labels in the validation set but not in training: {', '.join(missing)}",
                param="spec.validation_dataset",
            )
    if spec.exact_match is not None:
        held_out = val if spec.validation_dataset is not None else train
        if DatasetSchema(held_out.schema) not in COMPLETION_SCHEMAS:
            raise InvalidRequestError(
                f"exact_match compares generated completions, but dataset {held_out.id!r} "
                f"holds {held_out.schema} rows, which have none (it needs "
                f"{' or '.join(sorted(s.value for s in COMPLETION_SCHEMAS))} rows)",
                param="spec.exact_match",
            )
    base_tasks = (
        frozenset({FineTuneTask.CAUSAL_LM.value})
        if spec.task is FineTuneTask.CAUSAL_LM
        else CLASSIFIER_TASKS
    )
    check_model(session, settings, tenant_id, spec.base_model, "spec.base_model", base_tasks)
    _check_registered_name(spec)
    if spec.from_checkpoint is not None:
        ref = spec.from_checkpoint
        if get_job(session, ref.job_id, tenant_id) is None:
            raise InvalidRequestError(
                f"job {ref.job_id!r} does not exist", param="spec.from_checkpoint.job_id"
            )
        steps = {c.step for c in list_checkpoints(session, ref.job_id)}
        if not steps or (ref.step is not None and ref.step not in steps):
            raise InvalidRequestError(
                f"job {ref.job_id!r} has no checkpoint"
                + ("" if ref.step is None else f" at step {ref.step}"),
                param="spec.from_checkpoint",
            )


def _check_registered_name(spec: FineTuneSpec) -> None:
    """The name the job will register (`ft:<base>:<suffix>:<job id>`) must fit the registry's
    column: found too long only when the trained model is stored, it would fail the job
    after all its training."""
    name = model_name(spec.base_model, spec.task, spec.suffix, new_job_id())
    if len(name) > MODEL_NAME_LENGTH:
        raise InvalidRequestError(
            f"the model this job registers would be named {name[:40]}... ({len(name)} "
            f"characters, at most {MODEL_NAME_LENGTH}): use a shorter suffix or base model name",
            param="spec.suffix" if spec.suffix else "spec.base_model",
        )


def _check_batch(session: Session, settings: Settings, tenant_id: str, spec: BatchSpec) -> None:
    """The input file is a batch of requests to `spec.endpoint`, on models that resolve."""
    param = "spec.input_dataset"
    ds = _dataset(session, tenant_id, spec.input_dataset, param)
    if ds.schema != DatasetSchema.BATCH_REQUESTS.value:
        raise InvalidRequestError(
            f"dataset {ds.id!r} holds {ds.schema} rows; a batch needs a file of "
            "OpenAI batch request lines (custom_id, method, url, body)",
            param=param,
        )
    summary = ds.report.get("batch", {})
    if summary.get("endpoint") != spec.endpoint.value:
        raise InvalidRequestError(
            f"dataset {ds.id!r} calls {summary.get('endpoint')}; spec.endpoint is "
            f"{spec.endpoint.value}",
            param="spec.endpoint",
        )
    tasks = frozenset({FineTuneTask.CAUSAL_LM.value})
    for model in summary.get("models", []):
        if not re.fullmatch(MODEL_REF_PATTERN, model) or ".." in model.split("/"):
            raise InvalidRequestError(
                f"dataset {ds.id!r} names model {model!r}, which is not a model reference",
                param=param,
            )
        check_model(session, settings, tenant_id, model, param, tasks)


def local_model_dir(session: Session, settings: Settings, tenant_id: str, ref: str) -> Path | None:
    """The directory a worker will load for `ref`'s weights and tokenizer, when it is local."""
    base = serving_base(session, ref, tenant_id)
    if is_registry_name(base):
        model = get_model(session, base, tenant_id)
        if model is None:
            return None
        path = (settings.data_dir / model.path).resolve()
        if not path.is_relative_to(settings.data_dir.resolve()):
            return None
        return artifact_store(settings).fetch(path)
    local = artifact_store(settings).fetch(settings.models_dir / base)
    return local if local.is_dir() else None


def _check_grammar(spec: GenerateSpec) -> None:
    """The schema decoding enforces (a response format's, a forced tool call's) must compile
    into the grammar the workers use (what the library refuses, such as a oneOf whose
    branches overlap, is a 422 naming its reason, not a job that fails at the worker)."""
    schema = spec.output_schema
    if schema is None:
        return
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), overrides=cast("JsonCompileOptions", JSON_GRAMMAR_OPTIONS)
        )
        error = llguidance.LLMatcher.validate_grammar(grammar)
    except ValueError as exc:
        error = str(exc)
    if error:
        field = "tools" if spec.calls_tools else "response_format"
        raise InvalidRequestError(f"{field} cannot be enforced: {error}", param=f"spec.{field}")


def _check_generation(
    session: Session, settings: Settings, tenant_id: str, spec: GenerateSpec
) -> None:
    """A local model without a language-model head, token ids it does not have (in a prompt
    or a logit bias), and prompts it cannot take (too long for its context, no chat
    template): 422. A hub model is checked by the worker once it has the files."""
    directory = local_model_dir(session, settings, tenant_id, spec.model)
    if directory is None:
        return
    config = directory / "config.json"
    model = _generation_model(str(config), files_stamp((config,)))
    if model.refusal is not None:
        raise InvalidRequestError(f"model {spec.model!r} {model.refusal}", param="spec.model")
    outside = vocabulary_error(spec, model.vocab_size) if model.vocab_size is not None else None
    if outside is not None:
        raise InvalidRequestError(outside.message, param=outside.param)
    loaded = local_tokenizer(directory)
    if loaded is None:
        return  # no tokenizer.json: the worker checks the prompts
    tokenizer, limit = loaded
    try:
        encode_prompts(tokenizer, spec, limit)
    except PromptError as exc:
        raise InvalidRequestError(exc.message, param=exc.param) from exc


def _local_config(directory: Path) -> dict[str, Any] | None:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _check_rank(session: Session, settings: Settings, tenant_id: str, spec: PredictSpec) -> None:
    """Rank mode needs a sequence classifier that has the label to rank by."""
    tasks = frozenset({FineTuneTask.SEQUENCE_CLASSIFICATION.value})
    check_model(session, settings, tenant_id, spec.model, "spec.model", tasks)
    labels: list[str] | None = None
    if is_registry_name(spec.model):
        model = get_model(session, spec.model, tenant_id)
        labels = list(model.labels) if model is not None else None
    elif (settings.models_dir / spec.model).is_dir():
        config = _local_config(settings.models_dir / spec.model)
        if config is None:
            raise InvalidRequestError(
                f"model directory {spec.model!r} has no readable config.json", param="spec.model"
            )
        listed = config.get("architectures")
        architectures = [str(a) for a in listed] if isinstance(listed, list) else []
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            found = ", ".join(architectures) or "none recorded"
            raise InvalidRequestError(
                f"model {spec.model!r} is not a sequence classifier (architectures: {found}); "
                "rank scores pairs with a ...ForSequenceClassification model",
                param="spec.model",
            )
        id2label = config.get("id2label") or {}
        if isinstance(id2label, dict) and all(str(k).isdigit() for k in id2label):
            labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    if labels is None:
        return  # a hub id: the worker checks once it has the config
    try:
        rank_label(labels, spec.label)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="spec.label") from exc


CAUSAL_LM_HEADS = ("ForCausalLM", "LMHeadModel")  # GPT2LMHeadModel, LlamaForCausalLM, ...
# what may generate text besides those: a multimodal model whose text head the causal-LM
# loader takes (Gemma3ForConditionalGeneration); the worker refuses a checkpoint whose
# language-model head it does not find
TEXT_GENERATION_HEADS = (*CAUSAL_LM_HEADS, "ForConditionalGeneration")


def _architectures(config: dict[str, Any]) -> list[str]:
    listed = config.get("architectures")
    return [str(a) for a in listed] if isinstance(listed, list) else []


@dataclass(frozen=True)
class _GenerationModel:
    """What a local model's config.json says about generating text with it."""

    refusal: str | None  # why it cannot generate text; None when it can
    vocab_size: int | None  # token ids it scores (its logits' width), where recorded


@lru_cache(maxsize=64)
def _generation_model(config_path: str, stamp: tuple[int, ...]) -> _GenerationModel:
    """Read once per `stamp` of the config. A model without a language-model head (an
    encoder such as BertModel or a sentence embedder) would load with a head of untrained
    weights and answer noise."""
    config = _local_config(Path(config_path).parent) or {}
    architectures = _architectures(config)
    refusal = None
    if architectures and not any(a.endswith(TEXT_GENERATION_HEADS) for a in architectures):
        refusal = (
            f"has no language-model head ({', '.join(architectures)}): text generation "
            "needs a causal language model (...ForCausalLM, ...LMHeadModel)"
        )
    vocab = config.get("vocab_size")
    return _GenerationModel(refusal, vocab if isinstance(vocab, int) and vocab > 0 else None)


def _check_embed(session: Session, settings: Settings, tenant_id: str, spec: EmbedSpec) -> None:
    """An embedding job's model must be a full encoder, not an adapter nor a decoder-only
    language model, and its inputs must fit it: texts within its context (counted as the
    worker counts them), token ids within its vocabulary, `dimensions` its own width. A hub
    model is checked by the worker once it has the files."""
    check_model(session, settings, tenant_id, spec.model, "spec.model", None)
    registered = get_model(session, spec.model, tenant_id) if is_registry_name(spec.model) else None
    if registered is not None and registered.adapter:
        raise InvalidRequestError(
            f"model {spec.model!r} is an adapter; embeddings need a full encoder",
            param="spec.model",
        )
    directory = local_model_dir(session, settings, tenant_id, spec.model)
    config = _local_config(directory) if directory is not None else None
    if directory is None or config is None:
        return
    architectures = _architectures(config)
    if architectures and all(a.endswith(CAUSAL_LM_HEADS) for a in architectures):
        raise InvalidRequestError(
            f"model {spec.model!r} is a decoder-only language model ({', '.join(architectures)}), "
            "not an encoder: its mean-pooled hidden states are no sentence embedding",
            param="spec.model",
        )
    width = config.get("hidden_size")
    if spec.dimensions is not None and spec.dimensions != width:
        raise UnsupportedParameterError(
            f"model {spec.model!r} does not support dimensions: its embeddings have {width} "
            "dimensions and it is not trained to be shortened",
            param="spec.dimensions",
        )
    vocab = config.get("vocab_size")
    token_ids = spec.token_ids
    if token_ids is not None and isinstance(vocab, int):
        for i, ids in enumerate(token_ids):
            if any(t >= vocab for t in ids):
                raise InvalidRequestError(
                    f"input[{i}] holds a token id past the vocabulary of model {spec.model!r} "
                    f"({vocab} tokens)",
                    param="spec.input",
                )
    tokenizer_config = _json_object(directory / "tokenizer_config.json")
    limit = input_limit(config, tokenizer_config.get("model_max_length"))
    if limit is None:
        return
    if token_ids is not None:
        counts = [len(ids) for ids in token_ids]
    else:
        loaded = local_tokenizer(directory)
        if loaded is None:
            return  # no tokenizer.json: the worker counts
        counts = [len(loaded[0](text)["input_ids"]) for text in spec.texts or []]
    for i, count in enumerate(counts):
        if count > limit:
            raise ContextLengthExceededError(
                f"input[{i}] has {count} tokens; model {spec.model!r} takes at most {limit}",
                param="spec.input",
            )


def _json_object(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _check_retrieval(
    session: Session, settings: Settings, tenant_id: str, retrieval: RetrievalSpec
) -> None:
    ds = _dataset(session, tenant_id, retrieval.dataset, "spec.retrieval.dataset")
    if ds.schema not in (DatasetSchema.CHAT.value, DatasetSchema.PROMPT_COMPLETION.value):
        raise InvalidRequestError(
            f"dataset {ds.id!r} holds {ds.schema} rows; retrieval reads past Q&A from a chat "
            "or prompt_completion dataset",
            param="spec.retrieval.dataset",
        )
    check_model(
        session,
        settings,
        tenant_id,
        retrieval.embedding_model,
        "spec.retrieval.embedding_model",
        None,
    )


def _check_webhook(
    session: Session, settings: Settings, tenant_id: str, req: AnyJobRequest
) -> None:
    if req.webhook_url is None:
        return
    check_destination(req.webhook_url, settings.webhook_allowed_destinations)
    if not signing_secrets(session, tenant_id):
        raise InvalidRequestError(
            "create a webhook signing secret first (POST /v1/webhooks/secret)",
            param="webhook_url",
        )


def check_job_request(
    session: Session, settings: Settings, req: AnyJobRequest, tenant_id: str
) -> None:
    """Everything a job names (datasets, registered models, checkpoints) must exist and
    belong to `tenant_id`; another tenant's looks exactly like a missing one."""
    _check_webhook(session, settings, tenant_id, req)
    if isinstance(req, GenerateJobRequest):
        tasks = frozenset({FineTuneTask.CAUSAL_LM.value})
        check_model(session, settings, tenant_id, req.spec.model, "spec.model", tasks)
        _check_generation(session, settings, tenant_id, req.spec)
        _check_grammar(req.spec)
        if req.spec.retrieval is not None:
            _check_retrieval(session, settings, tenant_id, req.spec.retrieval)
    elif isinstance(req, FineTuneJobRequest):
        _check_finetune(session, settings, tenant_id, req.spec)
    elif isinstance(req, PredictJobRequest) and req.spec.mode is PredictMode.RANK:
        _check_rank(session, settings, tenant_id, req.spec)
    elif isinstance(req, PredictJobRequest):
        check_model(session, settings, tenant_id, req.spec.model, "spec.model", CLASSIFIER_TASKS)
        if req.spec.dataset is not None:
            _dataset(session, tenant_id, req.spec.dataset, "spec.dataset")
    elif isinstance(req, BatchJobRequest):
        _check_batch(session, settings, tenant_id, req.spec)
    elif isinstance(req, EmbedJobRequest):
        _check_embed(session, settings, tenant_id, req.spec)


def check_queued_quota(session: Session, settings: Settings, tenant_id: str) -> None:
    """429 `quota_exceeded` when the tenant already has its quota of queued jobs. The
    tenant's row stays locked until the caller's transaction (which inserts the job) ends,
    so concurrent submits cannot all count the same number and overshoot the quota."""
    limit = lock_queued_quota(session, tenant_id, settings.max_queued_jobs)
    if count_queued(session, tenant_id) >= limit:
        raise QuotaExceededError(
            f"this tenant already has {limit} queued jobs (its quota); retry when some have started"
        )
