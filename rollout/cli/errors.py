"""``rolloutctl``'s exit codes and the error that carries one."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    NOT_FOUND = 3
    REFUSED = 4
    TIMEOUT = 5
    UNAVAILABLE = 6
    INTERRUPTED = 130


class CliError(Exception):
    """A failure with its exit code and message."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code
