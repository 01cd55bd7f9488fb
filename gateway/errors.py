"""The gateway's exception tree: callers catch by what they will do about it.

::

GatewayError
├── PayloadRejected          the partner's request is refused as a whole (coded, 4xx)
│   ├── Unauthenticated      401 UNAUTHENTICATED / REPLAYED
│   ├── ScopeViolation       403 SCOPE_VIOLATION
│   └── PayloadTooLarge      413 PAYLOAD_TOO_LARGE
├── DeliveryError            raised inside delivery/, never past it
│   ├── RetriableDeliveryError   try again (in-call, then on the schedule)
│   └── PermanentDeliveryError   the request can never succeed as sent
├── UpstreamError            a pull or reference sync could not read its source
│   ├── RetriableUpstreamError   try again (tenacity, Retry-After honoured)
│   └── PermanentUpstreamError   the source refused the request as made
└── ConfigError              the deployment is wrong; fail fast at start
"""

from __future__ import annotations

from contracts.errors import message


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class PayloadRejected(GatewayError):
    status_code = 422
    default_code = "SCHEMA"

    def __init__(self, code: str | None = None, detail: str | None = None,
                 field: str | None = None, detail_zh: str | None = None) -> None:
        code = code or self.default_code
        en, zh = message(code)
        self.code, self.field = code, field
        self.message = f"{en} {detail}" if detail else en
        # The detail names the field or value; without a Chinese one, the English is shown
        # (a Chinese reader still needs to know which field or value).
        detail_zh = detail_zh or detail
        self.message_zh = f"{zh}{detail_zh}" if detail_zh else zh
        super().__init__(f"{code}: {self.message}")

    def as_body(self) -> dict[str, object]:
        return {"error": {"code": self.code, "field": self.field, "message": self.message,
                          "message_zh": self.message_zh}}


class Unauthenticated(PayloadRejected):
    status_code = 401
    default_code = "UNAUTHENTICATED"


class ScopeViolation(PayloadRejected):
    status_code = 403
    default_code = "SCOPE_VIOLATION"


class PayloadTooLarge(PayloadRejected):
    status_code = 413
    default_code = "PAYLOAD_TOO_LARGE"


class NotFound(PayloadRejected):
    status_code = 404
    default_code = "NOT_FOUND"


class Forbidden(PayloadRejected):
    status_code = 403
    default_code = "FORBIDDEN"


class DeliveryError(GatewayError):
    pass


class RetriableDeliveryError(DeliveryError):
    def __init__(self, reason: str, retry_after: float | None = None,
                 status_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason, self.retry_after, self.status_code = reason, retry_after, status_code


class PermanentDeliveryError(DeliveryError):
    def __init__(self, reason: str, status_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason, self.status_code = reason, status_code


class UpstreamError(GatewayError):
    """Reading a partner's or the management system's API failed (pulls, reference sync)."""

    def __init__(self, reason: str, status_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason, self.status_code = reason, status_code


class RetriableUpstreamError(UpstreamError):
    def __init__(self, reason: str, status_code: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(reason, status_code)
        self.retry_after = retry_after


class PermanentUpstreamError(UpstreamError):
    pass


class ConfigError(GatewayError):
    pass
