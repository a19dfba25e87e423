"""Standard Webhooks signatures, for the receiving side: `verify_webhook` checks that a
delivery was signed by Modelyard with your `whsec_...` secret. Standard library only.

A delivery carries `webhook-id`, `webhook-timestamp` (Unix seconds) and
`webhook-signature`: space-separated `v1,<base64 HMAC-SHA256>` entries over
`"{id}.{timestamp}.{body}"`. The signing itself lives in core/webhooks.py, where the
sender uses it; this module is its public face.
"""

from __future__ import annotations

from core.webhooks import (
    DEFAULT_TOLERANCE_S,
    SECRET_PREFIX,
    SIGNATURE_VERSION,
    WebhookVerificationError,
    new_secret,
    sign,
    signature_headers,
    verify_webhook,
)

__all__ = [
    "DEFAULT_TOLERANCE_S",
    "SECRET_PREFIX",
    "SIGNATURE_VERSION",
    "WebhookVerificationError",
    "new_secret",
    "sign",
    "signature_headers",
    "verify_webhook",
]
