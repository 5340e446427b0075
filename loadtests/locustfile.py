"""Realistic refund traffic for fraudwatch, run only through locust's CLI (never imported by the product).

Users
    ``RefundUser`` posts refund requests from the seeded synthetic stream (entity keys, retail amounts, item text,
    the seed's request shape, each row's IP, device and time as ``eventTime``; replayed in laps, each lap later in
    time than the one before by the stream's span and the velocity features' longest window, so that a lap does not
    look like every account refunding again) to ``/api/v1/refund-predict`` and remembers each answer's
    ``prediction_id`` (issued by the router) with the ground truth. ``LabelUser`` posts those labels to the router's
    feedback listener (``/api/v1/feedback`` on its control port, with the label feed's bearer token — never the
    public port) once their (time-compressed) label delay has passed — chargebacks arrive days later in reality,
    seconds later here.

Environment
    FW_LOAD_DATA: a labelled history file in the synthetic schema (CSV, e.g. the rollout demo's live traffic from
    ``fraudwatch demo-versions``) to replay instead of generating a stream;
    FW_LOAD_SEED (7), FW_LOAD_DRIFT (0/1), FW_LOAD_ROWS (50000), FW_LOAD_FRAUD_RATE and FW_LOAD_BURST_SHARE (the
    generator's): the stream;
    FW_LOAD_LABEL_SECONDS_PER_HOUR (0.02): label-delay compression (0.02 s per real hour → a week in ~3.4 s);
    FW_LOAD_LABEL_SHARE (1.0): share of answered requests that ever get a label;
    FW_LOAD_LABEL_USERS (1): label-feed users (of the -u total), posting due labels in parallel;
    FW_LOAD_WAIT_MIN / FW_LOAD_WAIT_MAX (0.01 / 0.05 s): think time per refund user;
    FW_LOAD_FEEDBACK_URL (``--host`` by default) and FW_LOAD_FEEDBACK_TOKEN: the router's control listener and the
    label feed's bearer token (``RouterProcess.control_url`` / ``feedback_token``).

Run, e.g.::

    locust -f loadtests/locustfile.py --headless -u 20 -r 10 -t 60s --host http://127.0.0.1:8080
    locust -f loadtests/locustfile.py,loadtests/shapes.py --headless --host ...   # FW_LOAD_SHAPE=steady|ramp|spike
"""

from __future__ import annotations

import heapq
import os
import threading
import time
import zlib
from typing import Any

import pandas as pd
from locust import HttpUser, between, constant, task

from service.data.synthetic import SyntheticConfig, generate
from service.data.velocity import DAY_MS, PREVIOUS_CAP_MS


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


SECONDS_PER_HOUR = _env_float("FW_LOAD_LABEL_SECONDS_PER_HOUR", 0.02)
LABEL_SHARE = _env_float("FW_LOAD_LABEL_SHARE", 1.0)


class _Stream:
    """The synthetic stream as API bodies with ground truth, replayed in laps forever, shared by all users of a
    process. Each lap after the first is moved later in time by :func:`lap_shift_ms` (its ``eventTime``), so that
    the online store's velocity features see every lap as the recorded stream once more, not as each account
    refunding again at the same instants."""

    def __init__(self) -> None:
        data = os.environ.get("FW_LOAD_DATA")
        frame = (
            pd.read_csv(data, dtype={"account_id": object, "itemDescription": object})
            if data
            else generate(
                SyntheticConfig(
                    n_requests=int(_env_float("FW_LOAD_ROWS", 50_000)),
                    seed=int(_env_float("FW_LOAD_SEED", 7)),
                    fraud_rate=_env_float("FW_LOAD_FRAUD_RATE", SyntheticConfig.fraud_rate),
                    drift=os.environ.get("FW_LOAD_DRIFT", "0") == "1",
                    burst_share=_env_float("FW_LOAD_BURST_SHARE", SyntheticConfig.burst_share),
                )
            )
        )
        records = frame.to_dict("records")
        self._rows = [
            (_body(row), int(row["is_fraud"]), float(row["label_delay_hours"]), index)
            for index, row in enumerate(records)
        ]
        self._times = [pd.Timestamp(row["timestamp"]) for row in records]
        self._lap_ms = lap_shift_ms(min(self._times), max(self._times))
        self._position = 0
        self._lock = threading.Lock()

    def next(self) -> tuple[dict[str, Any], int, float, int]:
        with self._lock:
            lap, index = divmod(self._position, len(self._rows))
            self._position += 1
        body, label, delay, row_index = self._rows[index]
        if lap:
            shifted = self._times[index] + pd.Timedelta(milliseconds=lap * self._lap_ms)
            body = {**body, "eventTime": shifted.isoformat()}
        return body, label, delay, row_index


def lap_shift_ms(first: pd.Timestamp, last: pd.Timestamp) -> int:
    """How much later each lap of a replayed stream is than the one before: the stream's span plus every window of
    the velocity features (the longest is the 30-day cap of the seconds since the previous refund) and a day, in
    whole days — no feature of a lap can then see the lap before it."""
    span_ms = int((last - first) / pd.Timedelta(milliseconds=1))
    return (span_ms // DAY_MS + 1) * DAY_MS + PREVIOUS_CAP_MS + DAY_MS


def _body(row: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "yearsActive": round(float(row["yearsActive"]), 4),
        "amount": float(row["amount"]),
        "ipAccounts": int(row["ipAccounts"]),
        "accountId": row["account_id"],
        # what the online store's velocity features are keyed by, and when (a replay: the row's own time)
        "eventTime": pd.Timestamp(row["timestamp"]).isoformat(),
    }
    for field, column in (
        ("itemDescription", "itemDescription"),
        ("ipAddress", "ip_address"),
        ("deviceId", "device_id"),
    ):
        if isinstance(row.get(column), str):
            body[field] = row[column]
    return body


class _PendingLabels:
    """Labels waiting for their delay to pass: a heap ordered by due time."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str, int]] = []
        self._lock = threading.Lock()

    def add(self, prediction_id: str, label: int, delay_hours: float) -> None:
        with self._lock:
            heapq.heappush(self._heap, (time.monotonic() + delay_hours * SECONDS_PER_HOUR, prediction_id, label))

    def pop_due(self) -> tuple[str, int] | None:
        with self._lock:
            if self._heap and self._heap[0][0] <= time.monotonic():
                _, prediction_id, label = heapq.heappop(self._heap)
                return prediction_id, label
        return None


def _gets_label(row_index: int) -> bool:
    """Deterministic sampling of which rows of the stream ever get a label (FW_LOAD_LABEL_SHARE)."""
    return LABEL_SHARE >= 1.0 or zlib.crc32(str(row_index).encode()) % 1000 < LABEL_SHARE * 1000


STREAM = _Stream()
PENDING = _PendingLabels()


class RefundUser(HttpUser):
    """A storefront asking whether to approve a refund."""

    weight = 10
    wait_time = between(_env_float("FW_LOAD_WAIT_MIN", 0.01), _env_float("FW_LOAD_WAIT_MAX", 0.05))

    @task
    def refund(self) -> None:
        body, label, delay, row_index = STREAM.next()
        with self.client.post(
            "/api/v1/refund-predict", json=body, name="refund-predict", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            # the label feed cites the router's prediction ID (the client's correlation ID joins nothing)
            prediction_id = response.json().get("prediction_id")
            if prediction_id and _gets_label(row_index):
                PENDING.add(prediction_id, label, delay)


FEEDBACK_URL = os.environ.get("FW_LOAD_FEEDBACK_URL", "")
FEEDBACK_HEADERS = {"Authorization": f"Bearer {os.environ.get('FW_LOAD_FEEDBACK_TOKEN', '')}"}


class LabelUser(HttpUser):
    """The chargeback / manual-review feed: posts ground truth once it is due."""

    weight = 1
    fixed_count = int(_env_float("FW_LOAD_LABEL_USERS", 1))
    wait_time = constant(0.005)

    @task
    def feedback(self) -> None:
        due = PENDING.pop_due()
        if due is None:
            time.sleep(0.05)
            return
        prediction_id, label = due
        with self.client.post(
            FEEDBACK_URL.rstrip("/") + "/api/v1/feedback" if FEEDBACK_URL else "/api/v1/feedback",
            headers=FEEDBACK_HEADERS,
            # no "source": the router stores the label under the source its bearer token authenticates
            json={"prediction_id": prediction_id, "label": "fraud" if label else "legit"},
            name="feedback",
            catch_response=True,
        ) as response:
            if response.status_code not in (200, 201):
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
