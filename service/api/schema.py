"""The public scoring API's request and response models.

The seed's contract works unchanged: ``{"yearsActive": 1.5, "amount": 45.00, "ipAccounts": 2}`` →
``{"prediction": 1, "confidence": 0.94, ...}``. Everything beyond those fields is optional (requests) or additive
(responses). Validation happens here, at the boundary, so a bad field is a 4xx that names it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

from service.common.logging import SAFE_ID_PATTERN

MAX_ENTITY_CHARS = 128
#: A correlation ID that is safe to log and echo (the same rule as the ``X-Correlation-ID`` header's).
CorrelationId = Annotated[str, StringConstraints(pattern=SAFE_ID_PATTERN)]
MAX_DESCRIPTION_CHARS = 500
MAX_BATCH_ITEMS = 1000
#: A caller that discards the answer's ``reasons`` (the router's shadow calls) sends this header with
#: :data:`REASONS_OFF`: no review decision and no ``explain`` of that call computes them.
REASONS_HEADER: Final[str] = "X-Fraudwatch-Reasons"
REASONS_OFF: Final[str] = "off"


class RefundRequest(BaseModel):
    """One refund request to be scored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)

    yearsActive: float = Field(..., ge=0.0, le=100.0, description="Age of the account in years.")
    amount: float = Field(..., ge=0.0, le=1_000_000.0, description="Refund amount in dollars.")
    ipAccounts: int = Field(..., ge=1, le=100_000, description="Accounts seen on the request's IP address.")
    accountId: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_ENTITY_CHARS,
        description="Entity key: looks up precomputed aggregates and pins canary stickiness.",
    )
    itemDescription: str | None = Field(
        None, max_length=MAX_DESCRIPTION_CHARS, description="Free-text description of the refunded item."
    )
    ipAddress: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_ENTITY_CHARS,
        description="The IP address the refund was requested from (or a stable pseudonym of it): distinct accounts "
        "per IP come from the online store's events, whatever ipAccounts says.",
    )
    deviceId: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_ENTITY_CHARS,
        description="The device (or payment instrument) fingerprint: distinct accounts per device in 24 h.",
    )
    eventTime: datetime | None = Field(
        None,
        description="When the refund was requested (ISO 8601; no zone = UTC). Used as the event's time only when "
        "the service is configured to trust it (serve.online_store.event_time=request: replays); else ignored.",
    )
    explain: bool = Field(
        False, description="Answer with the top contributing features (`reasons`) whatever the decision."
    )


class Reason(BaseModel):
    """A feature that pushed the score toward fraud: its SHAP value (XGBoost's ``pred_contribs``) in the booster's
    log-odds; the calibrated score is monotone in their sum."""

    feature: str = Field(..., description="The model feature, e.g. `ip_accounts` or `refund_rate`.")
    contribution: float = Field(..., description="Log-odds added toward fraud (> 0).")


Decision = Literal["approve", "review"]


class RefundResponse(BaseModel):
    """The decision on one refund request."""

    prediction: int = Field(..., ge=0, le=1, description="1 = fraud, 0 = legitimate.")
    confidence: float = Field(..., ge=0.0, le=1.0, description="Probability of the predicted class.")
    score: float = Field(..., ge=0.0, le=1.0, description="Calibrated probability of fraud.")
    decision: Decision
    threshold: float = Field(..., ge=0.0, le=1.0)
    model_version: str
    correlation_id: str
    #: Omitted when absent, never ``null``: BentoML's own client decodes an optional list as a list.
    reasons: list[Reason] | None = Field(
        None,
        description="For a review decision (or `explain`): the top features pushing toward fraud, largest first.",
        exclude_if=lambda reasons: reasons is None,
    )


class RoutedResponse(BaseModel):
    """The decision on one refund request as the router's public port answers it: the scoring contract plus the
    router's ``prediction_id`` (the key a label feed cites). With ``RouterSettings.expose_decision_details`` on, the
    model service's other fields and the route (``stage``, ``role``, ``routed_to``) are added."""

    prediction: int = Field(..., ge=0, le=1, description="1 = fraud, 0 = legitimate.")
    confidence: float = Field(..., ge=0.0, le=1.0, description="Probability of the predicted class.")
    decision: Decision
    prediction_id: str = Field(..., description="The router's unguessable ID of this prediction (labels cite it).")
    correlation_id: str = Field(..., description="The client's X-Correlation-ID when it is safe to log, else a UUID.")
    reasons: list[Reason] | None = Field(
        None, description="For a review decision (or `explain`): the top features pushing toward fraud, largest first."
    )


class BatchRequest(BaseModel):
    """Several refund requests scored in one call."""

    model_config = ConfigDict(extra="forbid")

    requests: list[RefundRequest] = Field(..., min_length=1, max_length=MAX_BATCH_ITEMS)
    correlation_ids: list[CorrelationId] | None = Field(
        None,
        description="One correlation ID per request, in order (e.g. a router batching shadow calls of several "
        "client requests); absent → every result carries the call's own correlation ID.",
    )

    @field_validator("correlation_ids")
    @classmethod
    def _one_id_per_request(cls, ids: list[str] | None, info: ValidationInfo) -> list[str] | None:
        requests = info.data.get("requests")
        if ids is not None and requests is not None and len(ids) != len(requests):
            raise ValueError(f"{len(ids)} IDs for {len(requests)} requests (one each, in order)")
        return ids


class BatchResponse(BaseModel):
    results: list[RefundResponse]
    model_version: str
    correlation_id: str


class ErrorDetail(BaseModel):
    """One invalid field: ``field`` is a dotted path such as ``amount`` or ``requests.3.ipAccounts``."""

    field: str
    message: str


class ErrorResponse(BaseModel):
    error: str
    details: list[ErrorDetail] = []
    correlation_id: str | None = None


def confidence_of(score: float, prediction: int) -> float:
    """The probability of the predicted class (the seed's ``confidence``)."""
    return score if prediction == 1 else 1.0 - score


def decision_of(prediction: int) -> Decision:
    return "review" if prediction == 1 else "approve"
