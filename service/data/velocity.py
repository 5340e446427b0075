"""Velocity and cross-entity features: ONE definition, used by training and by serving.

Training computes them point-in-time from a history (:func:`point_in_time`: every row read as of just before it,
labels counted from when they arrived); serving reads them from the online store (``service/data/online_store.py``),
which every scored request and every label updates. Both run the arithmetic of this module: training replays the
history through :class:`VelocityState` (the executable definition), and each store keeps the same state in its own
primitives (Redis: bucketed counters with TTLs, sorted sets; SQLite: tables) — tests/integration/test_online_store.py
replays a stream through the real stores and compares, value for value, with :func:`point_in_time`.

The features of a refund request of account ``a`` from IP ``i`` and device ``d`` at time ``t`` (milliseconds):

``acct_refunds_1h`` / ``acct_refunds_24h``
    refunds of ``a`` in the window, counted in buckets: the bucket of ``t`` and the ones before it, 12 buckets of
    5 minutes (55–60 min back) and 24 buckets of 1 hour (23–24 h back);
``acct_amount_24h``
    dollars ``a`` asked back in the 24-hour buckets (whole cents);
``acct_secs_since_prev``
    seconds since ``a``'s previous refund, capped at :data:`PREVIOUS_CAP_S` (30 days; no previous refund → the cap);
``ip_accounts_1h`` / ``ip_accounts_24h`` / ``device_accounts_24h``
    1 + the accounts other than ``a`` whose latest refund from ``i`` (``d``) is at or after ``t - window``
    (exact: no buckets), i.e. the distinct accounts of that IP (device) in the window, the requester included;
``acct_fraud_labels``
    fraud labels of ``a``'s earlier refunds that have arrived (chargebacks; a label counts from its arrival).

A request never counts itself: stores are written off the request's critical path, so a request may be read after
its own event was written (a shadow version scoring it a few milliseconds later) — the read then takes the event's
own contribution back out (it knows the event by its ID: :func:`event_id`). A request without an entity gets
:data:`NOTHING_SEEN`'s values for that entity's features, as does every request the store cannot answer in time.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

MINUTE_MS: Final[int] = 60_000
HOUR_MS: Final[int] = 60 * MINUTE_MS
DAY_MS: Final[int] = 24 * HOUR_MS
#: Buckets of the account windows: width in ms and how many buckets (the current one included) make the window.
SHORT_BUCKET_MS: Final[int] = 5 * MINUTE_MS
SHORT_BUCKETS: Final[int] = HOUR_MS // SHORT_BUCKET_MS
LONG_BUCKET_MS: Final[int] = HOUR_MS
LONG_BUCKETS: Final[int] = DAY_MS // LONG_BUCKET_MS
#: Windows of the distinct-account counts (exact).
IP_WINDOWS_MS: Final[tuple[int, int]] = (HOUR_MS, DAY_MS)
DEVICE_WINDOW_MS: Final[int] = DAY_MS
#: Seconds since the previous refund: older (or none) counts as this.
PREVIOUS_CAP_S: Final[float] = 30 * 86_400.0
PREVIOUS_CAP_MS: Final[int] = int(PREVIOUS_CAP_S * 1000)
#: How long the stores keep each kind of state (beyond that it cannot change a feature).
SHORT_TTL_MS: Final[int] = (SHORT_BUCKETS + 1) * SHORT_BUCKET_MS
LONG_TTL_MS: Final[int] = (LONG_BUCKETS + 1) * LONG_BUCKET_MS
SEEN_TTL_MS: Final[int] = max(*IP_WINDOWS_MS, DEVICE_WINDOW_MS)
LAST_TTL_MS: Final[int] = PREVIOUS_CAP_MS
LABEL_TTL_MS: Final[int] = 400 * DAY_MS

VELOCITY_FEATURES: Final[tuple[str, ...]] = (
    "acct_refunds_1h",
    "acct_refunds_24h",
    "acct_amount_24h",
    "acct_secs_since_prev",
    "ip_accounts_1h",
    "ip_accounts_24h",
    "device_accounts_24h",
    "acct_fraud_labels",
)


#: The burst features: they leave their default only inside a burst (a farm's accounts sharing an IP within the hour
#: or a device within the day), so their requests come in clusters, not independently, and a rollout stage's sample
#: does not state their distribution — the policies' drift gates (input-psi-max) do not judge them; dashboards and
#: the input-drift alert still show them (docs/architecture.md, "Gate statistics").
BURST_FEATURES: Final[tuple[str, ...]] = ("ip_accounts_1h", "device_accounts_24h")


@dataclass(frozen=True, slots=True)
class Velocity:
    """One request's velocity features (see the module docstring). ``known`` is False when they are the defaults
    served because the store could not answer (``velocity_known = 0`` for the model)."""

    acct_refunds_1h: float
    acct_refunds_24h: float
    acct_amount_24h: float
    acct_secs_since_prev: float
    ip_accounts_1h: float
    ip_accounts_24h: float
    device_accounts_24h: float
    acct_fraud_labels: float
    known: bool = True

    def values(self) -> tuple[float, ...]:
        """The features in :data:`VELOCITY_FEATURES` order."""
        return (
            self.acct_refunds_1h,
            self.acct_refunds_24h,
            self.acct_amount_24h,
            self.acct_secs_since_prev,
            self.ip_accounts_1h,
            self.ip_accounts_24h,
            self.device_accounts_24h,
            self.acct_fraud_labels,
        )


#: Nothing seen: no earlier refund, the requester alone on its IP and device, no fraud label. The conservative
#: default when the store cannot answer within its budget (the request is then not held against its velocity).
NOTHING_SEEN: Final[Velocity] = Velocity(0.0, 0.0, 0.0, PREVIOUS_CAP_S, 1.0, 1.0, 1.0, 0.0, known=False)


@dataclass(frozen=True, slots=True)
class RefundEvent:
    """A scored refund request as the store records it; also the query that reads its features (as of ``t_ms``,
    itself excluded). Entities are optional; ``amount_cents`` is the rounded amount in whole cents."""

    event_id: str
    t_ms: int
    account: str | None
    amount_cents: int
    ip: str | None = None
    device: str | None = None


@dataclass(frozen=True, slots=True)
class LabelEvent:
    """A label of an earlier refund of ``account``, arrived at ``t_ms`` (``label_id``: the prediction it labels)."""

    label_id: str
    t_ms: int
    account: str | None
    is_fraud: bool


def event_id(request_id: str, account: str | None, ip: str | None, device: str | None, amount_cents: int) -> str:
    """A refund event's ID: the request's ID (the correlation ID every version that scores the request receives)
    hashed with what the event writes. A replay of the same request is one event; a client that reuses one ID for
    different refunds cannot make them count once."""
    material = "\x1f".join((request_id, account or "", ip or "", device or "", str(amount_cents)))
    return hashlib.blake2b(material.encode("utf-8"), digest_size=16).hexdigest()


def cents(amount: float) -> int:
    """Dollars as whole cents, rounded half away from zero (19.994 → 1999, 19.995 → 2000): the rounding of the
    feature path (``service.data.features.round_amount``)."""
    return int(math.copysign(math.floor(abs(amount) * 100.0 + 0.5 + 1e-9), amount))


def short_window(t_ms: int) -> range:
    """The 5-minute bucket numbers of the 1-hour window at ``t_ms``."""
    last = t_ms // SHORT_BUCKET_MS
    return range(last - SHORT_BUCKETS + 1, last + 1)


def long_window(t_ms: int) -> range:
    """The 1-hour bucket numbers of the 24-hour window at ``t_ms``."""
    last = t_ms // LONG_BUCKET_MS
    return range(last - LONG_BUCKETS + 1, last + 1)


@dataclass(frozen=True, slots=True)
class AccountReading:
    """What a store returns for one account and the request's windows, before its own event is taken out."""

    refunds_1h: int
    refunds_24h: int
    cents_24h: int
    last_ms: int | None
    last_event: str | None
    prev_ms: int | None
    fraud_labels: int


@dataclass(frozen=True, slots=True)
class Reading:
    """A store's raw answer for one request: the account's windows, the distinct-account counts (the requester's
    account included if it was seen), whether the requester was seen in each, and when its own event was applied
    (None: not yet)."""

    account: AccountReading
    ip_counts: tuple[int, int]
    ip_self: tuple[bool, bool]
    device_count: int
    device_self: bool
    own_applied_ms: int | None


def resolve(query: RefundEvent, reading: Reading) -> Velocity:
    """The features of ``query`` from a store's raw ``reading``: the request's own event taken back out if the store
    has already applied it, the requester added to the distinct counts once."""
    acct = reading.account
    r1, r24, c24 = acct.refunds_1h, acct.refunds_24h, acct.cents_24h
    own = reading.own_applied_ms
    if own is not None and query.account is not None:
        if own // SHORT_BUCKET_MS in short_window(query.t_ms):
            r1 -= 1
        if own // LONG_BUCKET_MS in long_window(query.t_ms):
            r24 -= 1
            c24 -= query.amount_cents
    previous = acct.prev_ms if acct.last_event is not None and acct.last_event == query.event_id else acct.last_ms
    since = PREVIOUS_CAP_S if previous is None else min(max(query.t_ms - previous, 0) / 1000.0, PREVIOUS_CAP_S)
    ip_1h = reading.ip_counts[0] - int(reading.ip_self[0]) + 1
    ip_24h = reading.ip_counts[1] - int(reading.ip_self[1]) + 1
    device = reading.device_count - int(reading.device_self) + 1
    return Velocity(
        acct_refunds_1h=float(max(r1, 0)),
        acct_refunds_24h=float(max(r24, 0)),
        acct_amount_24h=max(c24, 0) / 100.0,
        acct_secs_since_prev=float(since),
        ip_accounts_1h=float(ip_1h),
        ip_accounts_24h=float(ip_24h),
        device_accounts_24h=float(device),
        acct_fraud_labels=float(acct.fraud_labels),
    )


_NO_ACCOUNT: Final[AccountReading] = AccountReading(0, 0, 0, None, None, None, 0)


@dataclass
class _Account:
    short: dict[int, list[int]] = field(default_factory=dict)  # bucket → [refunds, cents]
    long: dict[int, list[int]] = field(default_factory=dict)
    last_ms: int | None = None
    last_event: str | None = None
    prev_ms: int | None = None
    fraud_labels: int = 0


class VelocityState:
    """The definition, executable: the state every store keeps, in Python dictionaries. Training replays a
    history through it (:func:`point_in_time`); the stores keep the same state in their own primitives."""

    def __init__(self) -> None:
        self.accounts: dict[str, _Account] = {}
        self.ips: dict[str, dict[str, int]] = {}  # ip → account → its latest refund time there
        self.devices: dict[str, dict[str, int]] = {}
        self.applied: dict[str, int] = {}  # event ID → time (replays are no-ops)
        self.labels: set[str] = set()
        self.watermark_ms: int | None = None

    # ------------------------------------------------------------------ writes

    def apply(self, event: RefundEvent) -> bool:
        """Record a refund; False when its ID was applied before (a replay changes nothing)."""
        if event.event_id in self.applied:
            return False
        t = event.t_ms
        self.applied[event.event_id] = t
        self.watermark_ms = t if self.watermark_ms is None else max(self.watermark_ms, t)
        account = event.account
        if account is not None:
            state = self.accounts.setdefault(account, _Account())
            _add(state.short, t // SHORT_BUCKET_MS, event.amount_cents, SHORT_BUCKETS)
            _add(state.long, t // LONG_BUCKET_MS, event.amount_cents, LONG_BUCKETS)
            if state.last_ms is None or t > state.last_ms:
                state.prev_ms, state.last_ms, state.last_event = state.last_ms, t, event.event_id
            elif state.prev_ms is None or t > state.prev_ms:
                state.prev_ms = t
            if event.ip is not None:
                _seen(self.ips.setdefault(event.ip, {}), account, t)
            if event.device is not None:
                _seen(self.devices.setdefault(event.device, {}), account, t)
        return True

    def apply_label(self, label: LabelEvent) -> bool:
        """Record a label; False when its ID was applied before. Only fraud labels of a known account count."""
        if label.label_id in self.labels:
            return False
        self.labels.add(label.label_id)
        if label.is_fraud and label.account is not None:
            self.accounts.setdefault(label.account, _Account()).fraud_labels += 1
        return True

    # ------------------------------------------------------------------- reads

    def reading(self, query: RefundEvent) -> Reading:
        t = query.t_ms
        acct = query.account
        state = self.accounts.get(acct) if acct is not None else None
        account = _NO_ACCOUNT
        if state is not None:
            short_hi, long_hi = t // SHORT_BUCKET_MS, t // LONG_BUCKET_MS
            short_lo, long_lo = short_hi - SHORT_BUCKETS + 1, long_hi - LONG_BUCKETS + 1
            short = sum(cell[0] for bucket, cell in state.short.items() if short_lo <= bucket <= short_hi)
            long_n = long_c = 0
            for bucket, cell in state.long.items():
                if long_lo <= bucket <= long_hi:
                    long_n += cell[0]
                    long_c += cell[1]
            account = AccountReading(
                short, long_n, long_c, state.last_ms, state.last_event, state.prev_ms, state.fraud_labels
            )
        ip_1h = ip_24h = device = 0
        if query.ip is not None and query.ip in self.ips:
            ip_1h, ip_24h = _count_since(self.ips[query.ip], t - IP_WINDOWS_MS[0], t - IP_WINDOWS_MS[1])
        if query.device is not None and query.device in self.devices:
            device, _ = _count_since(self.devices[query.device], t - DEVICE_WINDOW_MS, t - DEVICE_WINDOW_MS)
        ip_seen = self.ips.get(query.ip, {}) if query.ip is not None else {}
        device_seen = self.devices.get(query.device, {}) if query.device is not None else {}
        return Reading(
            account=account,
            ip_counts=(ip_1h, ip_24h),
            ip_self=(
                _seen_since(ip_seen, acct, t - IP_WINDOWS_MS[0]),
                _seen_since(ip_seen, acct, t - IP_WINDOWS_MS[1]),
            ),
            device_count=device,
            device_self=_seen_since(device_seen, acct, t - DEVICE_WINDOW_MS),
            own_applied_ms=self.applied.get(query.event_id),
        )

    def read(self, query: RefundEvent) -> Velocity:
        return resolve(query, self.reading(query))


def _add(buckets: dict[int, list[int]], bucket: int, amount_cents: int, keep: int) -> None:
    cell = buckets.get(bucket)
    if cell is None:
        buckets[bucket] = [1, amount_cents]
        for stale in [b for b in buckets if b <= bucket - keep]:
            del buckets[stale]
    else:
        cell[0] += 1
        cell[1] += amount_cents


#: Accounts remembered per IP (device) before the stale ones are dropped.
_SEEN_TRIM_AT: Final[int] = 64


def _seen(seen: dict[str, int], account: str, t_ms: int) -> None:
    if seen.get(account, -1) < t_ms:
        seen[account] = t_ms
    if len(seen) > _SEEN_TRIM_AT:
        for stale in [other for other, t in seen.items() if t < t_ms - SEEN_TTL_MS]:
            del seen[stale]


def _count_since(seen: Mapping[str, int], start_a: int, start_b: int) -> tuple[int, int]:
    """How many accounts were seen at or after each of two instants."""
    a = b = 0
    for t in seen.values():
        if t >= start_a:
            a += 1
        if t >= start_b:
            b += 1
    return a, b


def _seen_since(seen: Mapping[str, int], account: str | None, start_ms: int) -> bool:
    return account is not None and seen.get(account, -1) >= start_ms


# --------------------------------------------------------------------------------------------- histories
#
# A history frame (the synthetic schema, time-ordered) as events: each row a refund at its timestamp; each labelled
# row also a label at ``timestamp + label_delay_hours`` (when the chargeback or the settlement arrived).

#: Columns of a history frame that the events read (optional ones may be absent: the entity is then unknown).
ENTITY_COLUMNS: Final[tuple[str, ...]] = ("ip_address", "device_id")


def _ms(frame: Any) -> npt.NDArray[np.int64]:
    stamps = frame["timestamp"]
    return np.asarray(stamps.to_numpy(dtype="datetime64[ms]").astype(np.int64))


def _strings(frame: Any, column: str) -> list[str | None]:
    if column not in frame.columns:
        return [None] * len(frame)
    return [value if isinstance(value, str) and value else None for value in frame[column].tolist()]


def refund_events(frame: Any) -> list[RefundEvent]:
    """One event per row of a time-ordered history frame (its ``request_id`` as the request's ID, else the row
    number)."""
    times = _ms(frame)
    accounts = _strings(frame, "account_id")
    ips, devices = _strings(frame, "ip_address"), _strings(frame, "device_id")
    ids = (
        [str(value) for value in frame["request_id"].tolist()]
        if "request_id" in frame.columns
        else [f"row-{i}" for i in range(len(frame))]
    )
    amounts = [cents(float(a)) for a in frame["amount"].tolist()]
    return [
        RefundEvent(event_id(ids[i], accounts[i], ips[i], devices[i], amounts[i]), int(times[i]), accounts[i],
                    amounts[i], ips[i], devices[i])
        for i in range(len(frame))
    ]  # fmt: skip


def label_events(frame: Any) -> list[LabelEvent]:
    """The labels of a history frame's rows, at their arrival (rows without ``label_delay_hours`` or
    ``is_fraud`` give none)."""
    if "label_delay_hours" not in frame.columns or "is_fraud" not in frame.columns:
        return []
    times = _ms(frame)
    delays = np.nan_to_num(frame["label_delay_hours"].to_numpy(dtype=float), nan=np.inf)
    accounts = _strings(frame, "account_id")
    frauds = frame["is_fraud"].to_numpy()
    ids = frame["request_id"].tolist() if "request_id" in frame.columns else list(range(len(frame)))
    return [
        LabelEvent(f"label-{ids[i]}", int(times[i] + round(delays[i] * HOUR_MS)), accounts[i], bool(frauds[i]))
        for i in range(len(frame))
        if math.isfinite(delays[i])
    ]


def replay(
    refunds: Sequence[RefundEvent], labels: Sequence[LabelEvent] = ()
) -> Iterator[tuple[int, RefundEvent | LabelEvent]]:
    """Refunds (in their order) and labels merged by time: ``(index, event)``, index -1 for labels. A label
    arriving at the same millisecond as a refund is applied after it (the refund is read first)."""
    pending = sorted(labels, key=lambda label: label.t_ms)
    j = 0
    for i, refund in enumerate(refunds):
        while j < len(pending) and pending[j].t_ms < refund.t_ms:
            yield -1, pending[j]
            j += 1
        yield i, refund
    # Labels after the last refund change no row's features.


def point_in_time(frame: Any, *, with_labels: bool = True) -> list[Velocity]:
    """For each row of a time-ordered history frame, its features as of just before it: every earlier row's refund
    and every label that had arrived by then (training's view; a live store serves the same values)."""
    refunds = refund_events(frame)
    return replay_reads(VelocityState(), refunds, label_events(frame) if with_labels else ())


def replay_reads(
    state: VelocityState, refunds: Sequence[RefundEvent], labels: Sequence[LabelEvent] = ()
) -> list[Velocity]:
    """Read each refund's features then apply it, labels applied as they arrive: the live store's view of a stream
    (``state`` may already hold what came before)."""
    out: list[Velocity] = [NOTHING_SEEN] * len(refunds)
    for index, event in replay(refunds, labels):
        if isinstance(event, LabelEvent):
            state.apply_label(event)
            continue
        out[index] = state.read(event)
        state.apply(event)
    return out


def frozen_reads(state: VelocityState, refunds: Iterable[RefundEvent]) -> list[Velocity]:
    """Each refund's features from ``state`` as it is, nothing applied: a store frozen at some cut."""
    return [state.read(event) for event in refunds]


def matrix(velocities: Sequence[Velocity]) -> npt.NDArray[np.float64]:
    """The features as rows (``VELOCITY_FEATURES`` order)."""
    if not velocities:
        return np.empty((0, len(VELOCITY_FEATURES)))
    return np.asarray([v.values() for v in velocities], dtype=np.float64)
