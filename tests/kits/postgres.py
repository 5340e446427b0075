"""A throwaway PostgreSQL server for integration tests: ``initdb`` + ``pg_ctl`` from Debian's package, on
127.0.0.1 with a free port and its unix socket in a temporary directory.

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` OS user (``runuser``); the data
directory lives under a fresh directory in the system temp dir that user can reach. Nothing is skipped: when the
server cannot start, :class:`PostgresUnavailableError` says why and the test fails.

Usage (a session fixture in the test module)::

    @pytest.fixture(scope="session")
    def postgres() -> Iterator[PostgresServer]:
        with running_postgres() as server:
            yield server
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from service.common.processes import free_port

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
PG_OS_USER = "postgres"
START_TIMEOUT_S = 60
INSTALL_HINT = "install it with `apt-get install -y postgresql` (scripts/ensure_system_packages.sh does)"


class PostgresUnavailableError(RuntimeError):
    """The test PostgreSQL server could not be started; the message says why."""


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    database: str
    base_dir: Path

    @property
    def dsn(self) -> str:
        """SQLAlchemy URL with the psycopg 3 driver."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{self.database}"


def pg_bin_dir() -> Path:
    candidates = sorted(glob.glob(PG_BIN_GLOB), key=_major_version)
    for candidate in reversed(candidates):
        path = Path(candidate)
        if (path / "initdb").exists() and (path / "pg_ctl").exists():
            return path
    raise PostgresUnavailableError(f"no PostgreSQL server binaries under {PG_BIN_GLOB}; {INSTALL_HINT}")


def _major_version(path: str) -> int:
    part = Path(path).parent.name
    return int(part) if part.isdigit() else 0


def _as_user_prefix() -> tuple[list[str], str]:
    """argv prefix to run the server's tools, and the database superuser name."""
    if os.geteuid() != 0:
        return [], pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam(PG_OS_USER)
    except KeyError as exc:
        raise PostgresUnavailableError(
            f"running as root and there is no {PG_OS_USER!r} OS user; {INSTALL_HINT}"
        ) from exc
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresUnavailableError("running as root and `runuser` is missing (util-linux)")
    return [runuser, "-u", PG_OS_USER, "--"], PG_OS_USER


def _run(argv: list[str], what: str, log: Path | None = None) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False)
    if result.returncode != 0:
        output = result.stderr.strip() or result.stdout.strip()
        server_log = f"; server log: {_tail(log)}" if log is not None else ""
        raise PostgresUnavailableError(f"{what} failed ({result.returncode}): {output}{server_log}")


@contextlib.contextmanager
def running_postgres(host: str = "127.0.0.1") -> Iterator[PostgresServer]:
    """Start a fresh cluster, yield its coordinates, stop it and delete its files."""
    bin_dir = pg_bin_dir()
    prefix, superuser = _as_user_prefix()
    base = Path(tempfile.mkdtemp(prefix="fw-pg-"))
    data, log = base / "data", base / "server.log"
    port = free_port(host)
    if prefix:
        entry = pwd.getpwnam(PG_OS_USER)
        os.chown(base, entry.pw_uid, entry.pw_gid)
    started = False
    try:
        _run(
            [*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", superuser, "--auth=trust", "-E", "UTF8",
             "--no-sync", "--no-instructions"],
            "initdb",
        )  # fmt: skip
        options = f"-h {host} -p {port} -k {base} -F -c fsync=off -c full_page_writes=off"
        _run(
            [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w",
             "-t", str(START_TIMEOUT_S), "start"],
            "pg_ctl start",
            log,
        )  # fmt: skip
        started = True
        yield PostgresServer(host=host, port=port, user=superuser, database="postgres", base_dir=base)
    finally:
        if started:
            subprocess.run(
                [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                capture_output=True,
                timeout=START_TIMEOUT_S,
                check=False,
            )
        shutil.rmtree(base, ignore_errors=True)


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return "<no log>"
