"""The histogram buckets of the router's metrics: the router exports them, the policy's gates query them."""

from __future__ import annotations

#: Histogram buckets (seconds) for request latencies, fine-grained in the single-digit milliseconds.
DEFAULT_LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
)


#: Buckets of the paired shadow score difference (candidate − stable), symmetric on [-1, 1].
DEFAULT_SCORE_DELTA_BUCKETS: tuple[float, ...] = (
    -1.0,
    -0.5,
    -0.25,
    -0.1,
    -0.05,
    -0.02,
    -0.01,
    -0.005,
    0.0,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
