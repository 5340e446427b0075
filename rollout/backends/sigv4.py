"""AWS Signature Version 4 (SigV4) for the metrics provider's requests (Amazon Managed Prometheus: service ``aps``),
with the standard library only (``hmac``, ``hashlib``): no botocore in the controller's image or import time.

Pure functions of a request and a signing instant. The canonical request follows the published algorithm
(https://docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html): the path as sent URI-encoded again
(no ``.``/``..`` normalisation: the provider's paths carry no such segments); the
query's names and values decoded and re-encoded with RFC 3986's unreserved set, sorted; the signed headers'
names in lower case, their values trimmed with inner runs of spaces folded; the payload's SHA-256. Checked against
AWS's SigV4 test suite and botocore's ``SigV4Auth`` (tests/unit/test_sigv4.py).

:func:`canonical_query` is also what the request must *carry*: a store that decodes ``+`` as a space or re-encodes
differently would otherwise compute another canonical form than the signer (:func:`sign` returns it).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final
from urllib.parse import parse_qsl, quote

ALGORITHM: Final[str] = "AWS4-HMAC-SHA256"
#: ``X-Amz-Date``'s format (ISO 8601 basic, UTC).
AMZ_DATE_FORMAT: Final[str] = "%Y%m%dT%H%M%SZ"
EMPTY_SHA256: Final[str] = hashlib.sha256(b"").hexdigest()
_UNRESERVED: Final[str] = "-_.~"


@dataclass(frozen=True, slots=True)
class Credentials:
    """An AWS access key (and the session token of temporary credentials). Never logged: ``repr`` hides it."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:
        return f"Credentials(access_key_id={self.access_key_id!r}, secret_access_key=<redacted>, session_token=…)"


@dataclass(frozen=True, slots=True)
class Signed:
    """What :func:`sign` adds to a request: its headers (``Authorization``, ``X-Amz-Date``, and
    ``X-Amz-Security-Token`` with temporary credentials), the query string to send, and the signature itself."""

    headers: dict[str, str]
    query: str
    signature: str


def canonical_path(path: str) -> str:
    """The path as sent (already percent-encoded) URI-encoded once more, ``/`` and RFC 3986's unreserved characters
    kept — every AWS service but S3 signs the path encoded twice; an empty path is ``/``."""
    return quote(path or "/", safe="/" + _UNRESERVED)


def canonical_query(query: str) -> str:
    """The query string's name=value pairs decoded (``+`` as a space: form encoding, as httpx and Prometheus read
    it), re-encoded with RFC 3986's unreserved set (a space is ``%20``) and sorted by name, then value; a name
    without ``=`` gets an empty value. A fixed point: the canonical query is its own canonical form."""
    pairs = parse_qsl(query, keep_blank_values=True)
    encoded = sorted((quote(k, safe=_UNRESERVED), quote(v, safe=_UNRESERVED)) for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in encoded)


def _trim(value: str) -> str:
    return " ".join(value.split())


def canonical_headers(headers: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """``(canonical headers, signed headers)``: names in lower case and sorted, values trimmed, repeated headers'
    values joined by commas in their order."""
    merged: dict[str, list[str]] = {}
    for name, value in headers:
        merged.setdefault(name.strip().lower(), []).append(_trim(value))
    names = sorted(merged)
    return "".join(f"{n}:{','.join(merged[n])}\n" for n in names), ";".join(names)


def canonical_request(
    method: str, path: str, query: str, headers: Iterable[tuple[str, str]], payload_sha256: str
) -> tuple[str, str]:
    """``(canonical request, signed headers)`` of a request whose signed headers are ``headers``."""
    block, signed = canonical_headers(headers)
    lines = (method.upper(), canonical_path(path), canonical_query(query), block, signed, payload_sha256)
    return "\n".join(lines), signed


def scope(instant: datetime, region: str, service: str) -> str:
    return f"{instant.strftime('%Y%m%d')}/{region}/{service}/aws4_request"


def string_to_sign(canonical: str, instant: datetime, region: str, service: str) -> str:
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{instant.strftime(AMZ_DATE_FORMAT)}\n{scope(instant, region, service)}\n{digest}"


def signing_key(secret_access_key: str, instant: datetime, region: str, service: str) -> bytes:
    key = f"AWS4{secret_access_key}".encode()
    for part in (instant.strftime("%Y%m%d"), region, service, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def authorization(
    credentials: Credentials, instant: datetime, region: str, service: str, canonical: str, signed_headers: str
) -> tuple[str, str]:
    """``(Authorization header, signature)`` of a canonical request."""
    key = signing_key(credentials.secret_access_key, instant, region, service)
    sts = string_to_sign(canonical, instant, region, service)
    signature = hmac.new(key, sts.encode("utf-8"), hashlib.sha256).hexdigest()
    credential = f"{credentials.access_key_id}/{scope(instant, region, service)}"
    return f"{ALGORITHM} Credential={credential}, SignedHeaders={signed_headers}, Signature={signature}", signature


def sign(
    credentials: Credentials,
    *,
    region: str,
    service: str,
    method: str,
    host: str,
    path: str,
    query: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    instant: datetime | None = None,
) -> Signed:
    """Sign one request at ``instant`` (now when not given): ``host``, ``X-Amz-Date``, the session token and
    ``headers`` (those the caller wants covered, e.g. a tenant header) are signed, with the body's SHA-256."""
    at = (instant or datetime.now(UTC)).astimezone(UTC)
    added = {"X-Amz-Date": at.strftime(AMZ_DATE_FORMAT)}
    if credentials.session_token is not None:
        added["X-Amz-Security-Token"] = credentials.session_token
    covered = [("host", host), *headers, *added.items()]
    payload = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
    canonical, signed_headers = canonical_request(method, path, query, covered, payload)
    header, signature = authorization(credentials, at, region, service, canonical, signed_headers)
    return Signed({**added, "Authorization": header}, canonical_query(query), signature)
