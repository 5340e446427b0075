"""service.common.logging: one JSON object per line whose own keys no event field can overwrite."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator

import pytest

from service.common.logging import configure_logging, correlation_scope, get_logger, log_event


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = configure_logging("INFO")
    handler = next(h for h in root.handlers if getattr(h, "fw_json", False))
    assert isinstance(handler, logging.StreamHandler)
    # Swapped without setStream: that flushes the previous stream, which an earlier test's capture may have closed.
    previous, handler.stream = handler.stream, stream
    yield stream
    handler.stream = previous


def logged(stream: io.StringIO) -> dict[str, object]:
    record: dict[str, object] = json.loads(stream.getvalue().splitlines()[-1])
    return record


def test_a_field_named_like_a_reserved_key_is_renamed_not_written_over_it(lines: io.StringIO) -> None:
    """Issue 12, point 7: the controller's 'model server adopted' line carried the server's pid in ``pid``, hiding
    which process logged it."""
    with correlation_scope("request-1"):
        log_event(get_logger("unit"), "model server adopted", event="workload_adopted", pid=4242,
                  correlation_id="another", ts="yesterday", exc_info="none")  # fmt: skip
    record = logged(lines)
    assert record["pid"] == os.getpid() and record["field_pid"] == 4242
    assert record["correlation_id"] == "request-1" and record["field_correlation_id"] == "another"
    assert record["ts"] != "yesterday" and record["field_ts"] == "yesterday"
    assert record["exc_info"] == "none"  # no exception: nothing to collide with
    assert record["event"] == "workload_adopted" and record["message"] == "model server adopted"


def test_a_field_equal_to_the_reserved_value_or_without_a_collision_is_kept_as_is(lines: io.StringIO) -> None:
    log_event(get_logger("unit"), "no scope", correlation_id="mine", server_pid=7)
    record = logged(lines)
    assert record["correlation_id"] == "mine" and "field_correlation_id" not in record
    assert record["server_pid"] == 7 and record["pid"] == os.getpid()
    with correlation_scope("same"):
        log_event(get_logger("unit"), "same value", correlation_id="same")
    assert "field_correlation_id" not in logged(lines)
