"""Checks on a monitor request that need the database or the models directory: the
classifier must be a sequence-classification model of the tenant (registered) or
installed, and its labels must include the negative one."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from api.job_checks import check_model
from core.enums import FineTuneTask
from core.errors import InvalidRequestError
from core.monitors import MonitorCreate, default_negative_label
from core.settings import Settings
from core.webhooks import check_destination
from db.registry import get_model, is_registry_name
from db.webhooks import signing_secrets

SEQUENCE_CLASSIFICATION = frozenset({FineTuneTask.SEQUENCE_CLASSIFICATION.value})


def _installed_labels(settings: Settings, ref: str) -> list[str]:
    models_dir = settings.models_dir.resolve()
    config_path = (models_dir / ref / "config.json").resolve()
    if not config_path.is_relative_to(models_dir) or not config_path.is_file():
        raise InvalidRequestError(
            f"model {ref!r} is neither registered nor installed in the models directory",
            param="model",
        )
    try:
        config: dict[str, Any] = json.loads(config_path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not an object")
    except (OSError, ValueError):
        raise InvalidRequestError(
            f"model {ref!r} has an unreadable config.json", param="model"
        ) from None
    architectures = [str(a) for a in config.get("architectures") or []]
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise InvalidRequestError(
            f"model {ref!r} is not a sequence classifier (architectures: "
            f"{', '.join(architectures) or 'none recorded'})",
            param="model",
        )
    id2label = config.get("id2label") or {}
    try:
        return [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (TypeError, ValueError):
        raise InvalidRequestError(f"model {ref!r} has malformed id2label", param="model") from None


def classifier_labels(session: Session, settings: Settings, tenant_id: str, ref: str) -> list[str]:
    """The labels of the sequence classifier `ref`; 422 when it is not one of the tenant's."""
    check_model(session, settings, tenant_id, ref, "model", SEQUENCE_CLASSIFICATION)
    if is_registry_name(ref):
        model = get_model(session, ref, tenant_id)
        assert model is not None  # check_model refused a missing one
        return list(model.labels)
    return _installed_labels(settings, ref)


def check_monitor(
    session: Session, settings: Settings, tenant_id: str, req: MonitorCreate
) -> tuple[list[str], str]:
    """The classifier's labels and the negative label, or a 422 naming what is wrong."""
    labels = classifier_labels(session, settings, tenant_id, req.model)
    if len(labels) < 2:
        raise InvalidRequestError(f"model {req.model!r} records no labels", param="model")
    negative = req.negative_label or default_negative_label(labels)
    if negative is None:
        raise InvalidRequestError(
            f"no label of {req.model!r} is named negative ({', '.join(labels)}); "
            "say which with negative_label",
            param="negative_label",
        )
    if negative not in labels:
        raise InvalidRequestError(
            f"negative_label {negative!r} is not a label of {req.model!r} ({', '.join(labels)})",
            param="negative_label",
        )
    if req.webhook_url is not None:
        check_destination(req.webhook_url, settings.webhook_allowed_destinations)
        if not signing_secrets(session, tenant_id):
            raise InvalidRequestError(
                "create a webhook signing secret first (POST /v1/webhooks/secret)",
                param="webhook_url",
            )
    return labels, negative
