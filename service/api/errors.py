"""The one builder of the API's error answers: :class:`~service.api.schema.ErrorResponse` bodies (from pydantic's
validation errors, one detail per invalid field) and the HTTP response carrying one — for the router, its label feed
and the retraining webhook; the model service's request guard sends the same body through its own ASGI path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from pydantic import ValidationError
from starlette.responses import Response

from service.api.schema import ErrorDetail, ErrorResponse
from service.common.logging import CORRELATION_HEADER

JSON_MEDIA_TYPE: Final[str] = "application/json"


def field_path(loc: Sequence[int | str]) -> str:
    """pydantic's error location as a dotted path: ``("requests", 3, "ipAccounts")`` → ``requests.3.ipAccounts``."""
    return ".".join(str(part) for part in loc) or "body"


def validation_details(exc: ValidationError) -> list[ErrorDetail]:
    """One detail per invalid field, named by its dotted path."""
    return [
        ErrorDetail(field=field_path(err["loc"]), message=str(err["msg"]))
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


def error_body(message: str, correlation_id: str | None = None, details: Sequence[ErrorDetail] = ()) -> ErrorResponse:
    return ErrorResponse(error=message, details=list(details), correlation_id=correlation_id)


def error_response(
    status: int, message: str, correlation_id: str | None = None, details: Sequence[ErrorDetail] = ()
) -> Response:
    """The JSON error body with ``status``, and the correlation ID echoed in its header when there is one."""
    body = error_body(message, correlation_id, details)
    headers = {CORRELATION_HEADER: correlation_id} if correlation_id else None
    return Response(body.model_dump_json(), status_code=status, media_type=JSON_MEDIA_TYPE, headers=headers)
