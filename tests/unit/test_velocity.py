"""The velocity features' one definition, on hand-made streams whose answers are known."""

from __future__ import annotations

import pandas as pd
import pytest

from service.data import velocity as v

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a bucket boundary of both widths
MIN = v.MINUTE_MS


def refund(n: int, minutes: float, account: str | None = "a", ip: str | None = "ip", device: str | None = None,
           cents: int = 1000) -> v.RefundEvent:  # fmt: skip
    return v.RefundEvent(f"e{n}", T0 + int(minutes * MIN), account, cents, ip, device)


def test_account_windows_count_whole_buckets_and_exclude_the_request_itself() -> None:
    state = v.VelocityState()
    for n, minutes in enumerate((0, 4, 30)):
        state.apply(refund(n, minutes, cents=500))
    at = refund(9, 62)  # 5-min bucket 12: the 1-hour window is buckets 1..12, so 0 and 4 min (bucket 0) fall out
    got = state.read(at)
    assert (got.acct_refunds_1h, got.acct_refunds_24h, got.acct_amount_24h) == (1.0, 3.0, 15.0)
    assert got.acct_secs_since_prev == 32 * 60.0
    state.apply(at)
    assert state.read(at) == got  # read after its own event was applied (a shadow): the same
    later = state.read(refund(10, 24 * 60 + 1))  # next day, hour bucket 24: window 1..24, hour 0 gone
    assert (later.acct_refunds_24h, later.acct_amount_24h) == (1.0, 10.0)


def test_distinct_accounts_per_ip_and_device_count_the_requester_once() -> None:
    state = v.VelocityState()
    for n, (account, minutes) in enumerate((("a", 0), ("b", 10), ("c", 50), ("b", 55))):
        state.apply(refund(n, minutes, account=account, device="dev"))
    got = state.read(refund(9, 70, account="b", device="dev"))
    assert got.ip_accounts_1h == 2.0  # since minute 10: c, and b (the requester, counted once however often seen)
    assert got.ip_accounts_24h == 3.0  # a, c + b
    assert got.device_accounts_24h == 3.0
    alone = state.read(refund(10, 70, account="z", ip="elsewhere", device=None))
    assert (alone.ip_accounts_1h, alone.device_accounts_24h) == (1.0, 1.0)


def test_nothing_seen_and_a_request_without_entities() -> None:
    state = v.VelocityState()
    got = state.read(refund(1, 0, account=None, ip=None))
    assert got.values() == v.NOTHING_SEEN.values() and got.known
    assert not v.NOTHING_SEEN.known


def test_labels_count_from_their_arrival_and_once() -> None:
    state = v.VelocityState()
    assert state.apply_label(v.LabelEvent("l1", T0, "a", True))
    assert not state.apply_label(v.LabelEvent("l1", T0, "a", True))  # replay
    state.apply_label(v.LabelEvent("l2", T0, "a", False))  # legitimate: not a fraud label
    assert state.read(refund(1, 1)).acct_fraud_labels == 1.0


def test_replays_change_nothing() -> None:
    state = v.VelocityState()
    assert state.apply(refund(1, 0))
    assert not state.apply(refund(1, 0))
    assert state.read(refund(2, 1)).acct_refunds_1h == 1.0


def test_point_in_time_reads_each_row_before_it_and_labels_after_their_delay() -> None:
    frame = pd.DataFrame(
        {
            "request_id": ["r1", "r2", "r3"],
            "timestamp": pd.to_datetime([T0, T0 + 10 * MIN, T0 + 3 * 60 * MIN], unit="ms"),
            "account_id": ["a", "a", "a"],
            "amount": [10.0, 20.0, 30.0],
            "ip_address": ["ip", "ip", "ip"],
            "is_fraud": [1, 0, 0],
            "label_delay_hours": [2.0, 1.0, 1.0],  # r1's chargeback arrives at 2 h: before r3, after r2
        }
    )
    r1, r2, r3 = v.point_in_time(frame)
    assert (r1.acct_refunds_24h, r2.acct_refunds_24h, r3.acct_refunds_24h) == (0.0, 1.0, 2.0)
    assert (r2.acct_fraud_labels, r3.acct_fraud_labels) == (0.0, 1.0)
    assert r2.acct_secs_since_prev == 600.0 and r1.acct_secs_since_prev == v.PREVIOUS_CAP_S
    assert [x.acct_fraud_labels for x in v.point_in_time(frame, with_labels=False)] == [0.0, 0.0, 0.0]


def test_event_ids_follow_the_request_and_what_it_writes() -> None:
    one = v.event_id("cid-1", "a", "ip", None, 1000)
    assert one == v.event_id("cid-1", "a", "ip", None, 1000)
    assert one != v.event_id("cid-1", "a", "ip", None, 1001)  # a reused request ID cannot hide another refund
    assert one != v.event_id("cid-2", "a", "ip", None, 1000)


@pytest.mark.parametrize(("amount", "expected"), [(19.994, 1999), (19.995, 2000), (0.0, 0), (45.0, 4500)])
def test_cents_round_like_the_feature_path(amount: float, expected: int) -> None:
    assert v.cents(amount) == expected
