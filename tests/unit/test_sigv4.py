"""The controller's SigV4 signer (rollout/backends/sigv4.py) against known values and an independent implementation.

(a) AWS's published Signature Version 4 test suite (tests/unit/data/aws4_testsuite: its requests, canonical requests
and Authorization headers, copied from botocore's tests/unit/auth/aws4_testsuite, Apache-2.0; the cases that need
path normalisation, multi-line header values or a token added after signing are left out: the provider's requests
have none). (b) botocore's ``SigV4Auth`` (a test-only dependency): the request the provider's client sends, signed
by ``ProviderAuth``, carries the Authorization header botocore computes for that same request — for PromQL, tenant
headers and session tokens drawn by Hypothesis. The signed queries against a real Prometheus behind a verifying
proxy: tests/integration/test_metrics_provider.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from botocore import auth as botocore_auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout.backends.prometheus import PrometheusAuthError, ProviderAuth, aws_credentials, describe
from rollout.backends.sigv4 import Credentials, canonical_query, canonical_request, sign
from rollout.settings import MetricsProviderSettings, SigV4Settings

SUITE = Path(__file__).parent / "data" / "aws4_testsuite"
CASES = sorted(p.stem for p in SUITE.glob("*.req"))
#: The suite's credentials, region and service (its readme); one case's token is not in its request file.
KEY = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
SUITE_TOKENS = {"get-vanilla-with-session-token": "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267"}
REGION, SERVICE = "us-east-1", "service"


def parse(case: str) -> tuple[str, str, str, list[tuple[str, str]], bytes]:
    """``(method, path, query, headers, body)`` of a test-suite request file."""
    head, _, body = (SUITE / f"{case}.req").read_text(encoding="utf-8").partition("\n\n")
    request_line, *lines = head.splitlines()
    method, rest = request_line.split(" ", 1)
    path, _, query = rest.rsplit(" ", 1)[0].partition("?")
    headers = [(name, value) for name, _, value in (line.partition(":") for line in lines)]
    return method, path, query, headers, body.encode("utf-8")


def test_the_suite_is_there() -> None:
    assert len(CASES) == 24, CASES
    assert (SUITE / "LICENSE").is_file() and (SUITE / "NOTICE").is_file()


@pytest.mark.parametrize("case", CASES)
def test_the_published_test_suite(case: str) -> None:
    method, path, query, headers, body = parse(case)
    given_headers = dict(headers)
    instant = datetime.strptime(given_headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    token = given_headers.get("X-Amz-Security-Token", SUITE_TOKENS.get(case))
    others = [(n, v) for n, v in headers if n.lower() not in {"host", "x-amz-date", "x-amz-security-token"}]
    signed = sign(
        Credentials(KEY.access_key_id, KEY.secret_access_key, token),
        region=REGION,
        service=SERVICE,
        method=method,
        host=given_headers["Host"],
        path=path,
        query=query,
        headers=others,
        body=body,
        instant=instant,
    )
    assert signed.headers["Authorization"] == (SUITE / f"{case}.authz").read_text(encoding="utf-8").strip()
    assert signed.headers["X-Amz-Date"] == "20150830T123600Z"
    assert signed.headers.get("X-Amz-Security-Token") == token
    payload = (SUITE / f"{case}.creq").read_text(encoding="utf-8").rsplit("\n", 1)[-1]
    added = [("X-Amz-Security-Token", SUITE_TOKENS[case])] if case in SUITE_TOKENS else []
    canonical, _ = canonical_request(method, path, query, [*headers, *added], payload)
    assert canonical == (SUITE / f"{case}.creq").read_text(encoding="utf-8")


def test_the_canonical_query_is_its_own_canonical_form() -> None:
    sent = canonical_query("query=sum%28a%7Bb%3D%22c%22%7D%29+%2F+2+%2B+1&time=1.5")
    assert sent == "query=sum%28a%7Bb%3D%22c%22%7D%29%20%2F%202%20%2B%201&time=1.5"
    assert canonical_query(sent) == sent


def botocore_authorization(request: httpx.Request, credentials: Credentials, sigv4: SigV4Settings) -> str:
    """What botocore's SigV4Auth signs for the request as sent: its URL, method, body and the headers ours signed."""
    signed_names = request.headers["Authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    headers = {name: request.headers[name] for name in signed_names if name not in {"x-amz-date"}}
    boto = AWSRequest(method=request.method, url=str(request.url), headers=headers, data=request.content)
    signer = botocore_auth.SigV4Auth(
        BotoCredentials(credentials.access_key_id, credentials.secret_access_key, credentials.session_token),
        sigv4.service,
        sigv4.region,
    )
    sent_at = datetime.strptime(request.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    original = botocore_auth.get_current_datetime
    botocore_auth.get_current_datetime = lambda: sent_at
    try:
        signer.add_auth(boto)
    finally:
        botocore_auth.get_current_datetime = original
    return str(boto.headers["Authorization"])


def key_files(tmp: Path, credentials: Credentials) -> dict[str, str]:
    files = {"access_key_id_file": credentials.access_key_id, "secret_access_key_file": credentials.secret_access_key}
    if credentials.session_token is not None:
        files["session_token_file"] = credentials.session_token
    for name, content in files.items():
        (tmp / name).write_text(content + "\n", encoding="utf-8")
    return {name: str(tmp / name) for name in files}


PROMQL = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=80)
TENANT = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9 _.:/=-]{0,30}[A-Za-z0-9]", fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(
    promql=PROMQL,
    tenant=TENANT,
    token=st.none() | st.from_regex(r"[A-Za-z0-9/+=]{20,80}", fullmatch=True),
    region=st.sampled_from(["us-east-1", "eu-west-2", "ap-southeast-2", "us-gov-west-1"]),
    path=st.sampled_from(["/api/v1/query", "/workspaces/ws-0a1b2c3d-4e5f/api/v1/query_range", "/-/ready", "/a b/ሴ"]),
    at=st.none() | st.floats(min_value=0, max_value=2e9, allow_nan=False),
)
def test_the_provider_signs_as_botocore_does(
    tmp_path_factory: pytest.TempPathFactory,
    promql: str,
    tenant: str,
    token: str | None,
    region: str,
    path: str,
    at: float | None,
) -> None:
    credentials = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", token)
    sigv4 = SigV4Settings.model_validate({"region": region, **key_files(tmp_path_factory.mktemp("key"), credentials)})
    provider = MetricsProviderSettings(headers={"X-Scope-OrgID": tenant}, sigv4=sigv4)
    params = {"query": promql} if at is None else {"query": promql, "time": f"{at:.3f}"}
    client = httpx.Client(base_url=f"https://aps-workspaces.{region}.amazonaws.com", headers=provider.headers)
    request = client.build_request("GET", path, params=params)
    flow = ProviderAuth(provider).auth_flow(request)
    sent = next(flow)
    assert sent.headers.get("X-Amz-Security-Token") == token
    assert botocore_authorization(sent, credentials, sigv4) == sent.headers["Authorization"]
    assert httpx.QueryParams(sent.url.query.decode()) == httpx.QueryParams(params), "the query means the same"
    assert "x-scope-orgid" in sent.headers["Authorization"]


def test_a_body_is_signed_as_botocore_signs_it(tmp_path: Path) -> None:
    credentials = Credentials("AKIAIOSFODNN7EXAMPLE", "secret")
    sigv4 = SigV4Settings.model_validate({"region": "eu-west-1", **key_files(tmp_path, credentials)})
    provider = MetricsProviderSettings(sigv4=sigv4)
    request = httpx.Request("POST", "https://aps.example/api/v1/query", data={"query": 'up{job="a b"}'})
    sent = next(ProviderAuth(provider).auth_flow(request))
    assert botocore_authorization(sent, credentials, sigv4) == sent.headers["Authorization"]


def test_the_key_is_read_at_each_request_from_files_then_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = key_files(tmp_path, Credentials("AKIDFILE", "file-secret", "file-token"))
    assert aws_credentials(SigV4Settings.model_validate({"region": "eu-west-1", **files})) == Credentials(
        "AKIDFILE", "file-secret", "file-token"
    )
    (tmp_path / "access_key_id_file").write_text("AKIDROTATED", encoding="utf-8")
    rotated = aws_credentials(SigV4Settings.model_validate({"region": "eu-west-1", **files}))
    assert rotated.access_key_id == "AKIDROTATED"
    from_env = SigV4Settings(region="eu-west-1")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(PrometheusAuthError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        aws_credentials(from_env)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    assert aws_credentials(from_env) == Credentials("AKIDENV", "env-secret", None)
    (tmp_path / "secret_access_key_file").unlink()
    with pytest.raises(PrometheusAuthError, match=r"sigv4\.secret_access_key_file .* cannot be read"):
        aws_credentials(SigV4Settings.model_validate({"region": "eu-west-1", **files}))


def test_the_key_never_shows() -> None:
    credentials = Credentials("AKIDEXAMPLE", "s3cret-key", "s3cret-token")
    assert "s3cret" not in repr(credentials)
    provider = MetricsProviderSettings(sigv4=SigV4Settings(region="eu-west-1"))
    assert describe(provider) == "a SigV4 signature (aps, eu-west-1)"
