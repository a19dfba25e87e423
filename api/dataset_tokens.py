"""A dataset's token counts against a model's tokenizer (GET /v1/datasets/{id}/tokens).

The rows are encoded by core.example_tokens, the rules training encodes them by, with the
tokenizer the API builds from the model's files (api/tokenizers.py): an installed base model
under models/, or a registered fine-tuned model of the caller's tenant. A model the API
cannot read here (a hub id not downloaded, a tokenizer without tokenizer.json) gets a typed
error, never a guess.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jinja2
from sqlalchemy.orm import Session

from api.job_checks import local_model_dir
from api.schemas import DatasetTokensOut
from api.tokenizers import local_tokenizer
from core.datasets import load_dataset_rows
from core.enums import DatasetSchema
from core.errors import InvalidRequestError, ModelNotFoundError, NotFoundError
from core.example_tokens import TRAINING_SCHEMAS, count_tokens
from core.model_sources import into_tenant_files
from core.settings import Settings
from core.specs import Hyperparameters
from core.storage import artifact_store
from db.models import Dataset
from db.registry import is_registry_name

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = Hyperparameters().max_length


def _model_dir(session: Session, settings: Settings, tenant_id: str, ref: str) -> Path:
    """The directory whose tokenizer counts for `ref`; ModelNotFoundError when there is
    none on this host that the caller may read."""
    outside = ".." in ref.split("/") or (
        not is_registry_name(ref) and into_tenant_files(settings, ref)
    )
    directory = None if outside else local_model_dir(session, settings, tenant_id, ref)
    if directory is None:
        raise ModelNotFoundError(
            f"model {ref!r} is neither installed on this host nor registered: tokens are "
            "counted with the tokenizer files of an installed or registered model",
            param="model",
        )
    return directory


def dataset_tokens(
    session: Session,
    settings: Settings,
    tenant_id: str,
    dataset: Dataset,
    model: str,
    max_length: int | None,
) -> DatasetTokensOut:
    dataset_id, stored, fmt = dataset.id, dataset.path, dataset.format
    schema = DatasetSchema(dataset.schema)
    if schema not in TRAINING_SCHEMAS:
        raise InvalidRequestError(
            f"dataset {dataset_id!r} holds {schema.value} rows, which are not training examples",
            param="dataset_id",
        )
    directory = _model_dir(session, settings, tenant_id, model)
    # Counting a large file takes a while: no transaction stays open through it (PostgreSQL
    # ends a session idle in one after database_idle_in_transaction_s).
    session.rollback()
    loaded = local_tokenizer(directory)
    if loaded is None:
        raise InvalidRequestError(
            f"model {model!r} has no readable tokenizer.json: the API counts tokens only with "
            "a fast tokenizer's files",
            param="model",
        )
    tokenizer, context = loaded
    if max_length is None:
        max_length = min(DEFAULT_MAX_LENGTH, context) if context else DEFAULT_MAX_LENGTH
    data_dir = settings.data_dir.resolve()
    path = (data_dir / stored).resolve()
    if not path.is_relative_to(data_dir):
        raise NotFoundError(f"dataset {dataset_id!r} has no file", param="dataset_id")
    rows = load_dataset_rows(artifact_store(settings).fetch(path), fmt)
    try:
        counts = count_tokens(tokenizer, schema, rows, max_length)
    except (jinja2.TemplateError, ValueError, TypeError) as exc:
        raise InvalidRequestError(
            f"model {model!r}'s tokenizer cannot encode this dataset's rows: {exc}",
            param="model",
        ) from exc
    logger.info(
        "dataset %s counted with %s: %d examples, %d tokens",
        dataset_id,
        model,
        counts.examples,
        counts.tokens,
    )
    return DatasetTokensOut(
        dataset_id=dataset_id,
        model=model,
        schema=schema.value,
        examples=counts.examples,
        tokens=counts.tokens,
        min_tokens=counts.min_tokens,
        mean_tokens=counts.mean_tokens,
        max_tokens=counts.max_tokens,
        max_length=counts.max_length,
        context_length=context,
        truncated=counts.truncated,
        tokens_kept=counts.tokens_kept,
    )
