"""HTTP plumbing shared by the project's Starlette apps (the router, the retraining webhook): a bounded body read and
a constant-time bearer-token check."""

from __future__ import annotations

import hmac
from typing import Final

from starlette.requests import Request

_BEARER: Final[str] = "bearer"


def bearer_matches(authorization: str | None, secret: str | None) -> bool:
    """Constant-time check of an ``Authorization: Bearer <token>`` header against the configured secret."""
    if secret is None or authorization is None:
        return False
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != _BEARER:
        return False
    return hmac.compare_digest(presented.strip().encode("utf-8"), secret.encode("utf-8"))


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
