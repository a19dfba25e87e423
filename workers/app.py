"""The Celery app. Importing it loads no model and no torch."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from core.dispatch import make_celery
from core.settings import get_settings

logger = logging.getLogger(__name__)

celery_app = make_celery(get_settings())
celery_app.conf.include = ["workers.tasks"]


@signals.worker_ready.connect
def _reconcile_on_start(**_: Any) -> None:
    from workers.tasks import run_reconcile

    try:
        run_reconcile()
    except Exception:
        logger.exception("reconcile at worker start failed")
