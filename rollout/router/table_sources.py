"""Where routing tables come from, and the store the router reads them from.

A source pushes tables into a :class:`TableSink` (the router's :class:`TableStore`). Sources are pluggable:

* :class:`FileTableSource` — a local JSON/YAML file polled by (mtime, size, inode), off the request path;
* the admin endpoint ``PUT /admin/routing`` of the router (push, no task of its own);
* :class:`KubeRolloutTableSource` — the ``status.routing`` of one Kubernetes ``ModelRollout``, watched (the
  controller writes it; a revert reaches the router with the watch event, milliseconds after the write).

The store refuses a table whose ``generation`` is older than the one it holds (a delayed or replayed write never
undoes a newer decision) and compiles each accepted table once into a :class:`~rollout.core.routing.RoutePlan`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Protocol

import yaml
from pydantic import ValidationError

from rollout.core.routing import RoutePlan, RoutingTable
from rollout.settings import RouterKubeSettings

logger = logging.getLogger(__name__)

OfferResult = Literal["applied", "unchanged", "stale"]
RefusalReason = Literal["invalid", "missing"]
_YAML_SUFFIXES: Final[frozenset[str]] = frozenset({".yaml", ".yml"})


class TableSink(Protocol):
    """What a source hands its tables to."""

    def offer(self, table: RoutingTable, source: str) -> OfferResult: ...

    def refuse(self, source: str, reason: RefusalReason, detail: str) -> None: ...


class TableSource(Protocol):
    """A long-running producer of routing tables (file poller, Kubernetes watch, …)."""

    name: str

    def load_now(self) -> RoutingTable | None:
        """The table available right now, read synchronously at startup (None when there is none yet)."""
        ...

    async def run(self, sink: TableSink) -> None:
        """Push every new table to ``sink`` until cancelled."""
        ...


class StoreObserver(Protocol):
    def table_applied(self, plan: RoutePlan, source: str) -> None: ...

    def table_refused(self, source: str, result: str, detail: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Current:
    plan: RoutePlan
    source: str


class TableStore:
    """The router's current routing plan; every accepted table replaces it atomically (one reference swap)."""

    def __init__(self, observers: tuple[StoreObserver, ...] = (), sticky_key: bytes | None = None) -> None:
        """``sticky_key``: the router's secret key of sticky assignment (:func:`rollout.core.routing.keyed_salt`)."""
        self._current: Current | None = None
        self._observers = list(observers)
        self._sticky_key = sticky_key

    def add_observer(self, observer: StoreObserver) -> None:
        self._observers.append(observer)

    @property
    def current(self) -> Current | None:
        return self._current

    @property
    def plan(self) -> RoutePlan | None:
        current = self._current
        return current.plan if current is not None else None

    def offer(self, table: RoutingTable, source: str) -> OfferResult:
        held = self._current
        if held is not None:
            if table.generation < held.plan.table.generation:
                detail = f"generation {table.generation} is older than the current {held.plan.table.generation}"
                self._notify_refused(source, "stale", detail)
                return "stale"
            if table == held.plan.table:
                return "unchanged"
        plan = RoutePlan.compile(table, self._sticky_key)
        self._current = Current(plan=plan, source=source)
        for observer in self._observers:
            observer.table_applied(plan, source)
        return "applied"

    def refuse(self, source: str, reason: RefusalReason, detail: str) -> None:
        self._notify_refused(source, reason, detail)

    def _notify_refused(self, source: str, result: str, detail: str) -> None:
        for observer in self._observers:
            observer.table_refused(source, result, detail)


def parse_table(text: str, *, yaml_format: bool) -> RoutingTable:
    """A table from JSON or YAML text; raises ``ValueError`` (incl. pydantic's ``ValidationError``)."""
    if yaml_format:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"not valid YAML: {exc}") from exc
        return RoutingTable.model_validate(data)
    return RoutingTable.model_validate_json(text)


def is_yaml_path(path: Path) -> bool:
    return path.suffix.lower() in _YAML_SUFFIXES


def read_table_file(path: Path) -> RoutingTable:
    return parse_table(path.read_text(encoding="utf-8"), yaml_format=is_yaml_path(path))


def write_table_file(path: Path, table: RoutingTable) -> None:
    """Write atomically (temporary file + rename), so a poller never reads half a table."""
    if is_yaml_path(path):
        text = yaml.safe_dump(table.model_dump(mode="json"), sort_keys=False)
    else:
        text = json.dumps(table.model_dump(mode="json"), indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


FileSignature = tuple[int, int, int]


def file_signature(path: Path) -> FileSignature | None:
    """(mtime ns, size, inode), or None when the file does not exist."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class FileTableSource:
    """A routing table in a local JSON/YAML file, re-read when its (mtime, size, inode) changes.

    An unreadable or invalid file leaves the current table in place; it is reported once per version of the
    file and re-read at every poll until it parses (a writer that does not rename atomically may have been
    caught half-way).
    """

    name = "file"

    def __init__(self, path: Path, interval_s: float) -> None:
        self.path = path
        self.interval_s = interval_s
        self._loaded: FileSignature | None = None
        self._reported: FileSignature | None = None
        self._reported_missing = False

    def load_now(self) -> RoutingTable | None:
        signature = file_signature(self.path)
        if signature is None:
            return None
        try:
            table = read_table_file(self.path)
        except (OSError, ValueError) as exc:
            logger.warning("routing file unreadable at startup", extra={"path": str(self.path), "error": str(exc)})
            return None
        self._loaded = signature
        return table

    def poll(self, sink: TableSink) -> None:
        """One poll step: offer the file's table to ``sink`` if the file changed since it was last loaded."""
        signature = file_signature(self.path)
        if signature is None:
            if not self._reported_missing:
                self._reported_missing = True
                sink.refuse(self.name, "missing", f"{self.path} does not exist")
            return
        self._reported_missing = False
        if signature == self._loaded:
            return
        try:
            table = read_table_file(self.path)
        except (OSError, ValueError) as exc:
            if signature != self._reported:
                self._reported = signature
                sink.refuse(self.name, "invalid", _short_error(exc))
            return
        self._loaded = signature
        sink.offer(table, self.name)

    async def run(self, sink: TableSink) -> None:
        while True:
            self.poll(sink)
            await asyncio.sleep(self.interval_s)


class KubeRolloutTableSource:
    """The routing table in a ModelRollout's ``status.routing``: read at startup, then watched (the official
    Kubernetes client, in an informer thread: one GET, then a watch from its resourceVersion, re-listed after a
    410, an error or the resync interval). Each new table is handed to the sink on the event loop. An invalid
    table is refused (reported once per object version) and the current one stays in force.

    Only ``get`` and ``watch`` of that one ModelRollout are needed (the chart's router Role)."""

    name = "modelrollout"

    def __init__(self, settings: RouterKubeSettings) -> None:
        if settings.rollout_name is None:
            raise ValueError("router.kube.rollout_name is not set")
        from rollout.backends.kube.api import KubeApi, pod_namespace

        self.settings = settings
        self.rollout_name = settings.rollout_name
        self.namespace = settings.namespace or pod_namespace() or "default"
        self.api = KubeApi.connect(settings.kubeconfig, settings.context, settings.request_timeout_s)
        self._last: tuple[str, str] | None = None

    def _path(self) -> str:
        from rollout.backends.kube.api import rollout_path

        return rollout_path(self.namespace, self.rollout_name)

    def load_now(self) -> RoutingTable | None:
        from rollout.backends.kube.api import KubeError

        try:
            obj = self.api.get(self._path())
        except KubeError as exc:
            logger.warning("ModelRollout unreadable at startup", extra={"path": self._path(), "error": str(exc)})
            return None
        table = self._table(obj) if obj is not None else None
        return table if isinstance(table, RoutingTable) else None

    def _table(self, obj: dict[str, object]) -> RoutingTable | str | None:
        """The object's table, the reason it is invalid, or None when it has none yet."""
        status = obj.get("status")
        raw = status.get("routing") if isinstance(status, dict) else None
        if raw is None:
            return None
        try:
            return RoutingTable.model_validate(raw)
        except ValidationError as exc:
            return _short_error(exc)

    async def run(self, sink: TableSink) -> None:
        from rollout.backends.kube.api import Informer, rollout_path

        loop = asyncio.get_running_loop()

        def changed(kind: str, obj: dict[str, object]) -> None:
            if kind == "DELETED":
                return
            table = self._table(obj)
            if table is None:
                return
            metadata = obj.get("metadata")
            version = str(metadata.get("resourceVersion", "")) if isinstance(metadata, dict) else ""
            if isinstance(table, str):
                if self._last != ("invalid", version):
                    self._last = ("invalid", version)
                    loop.call_soon_threadsafe(sink.refuse, self.name, "invalid", table)
                return
            loop.call_soon_threadsafe(sink.offer, table, self.name)

        informer = Informer(
            self.api,
            rollout_path(self.namespace),
            "modelrollout",
            name=self.rollout_name,
            watch_timeout_s=self.settings.watch_timeout_s,
            retry_backoff_s=self.settings.retry_backoff_s,
            on_change=changed,
        )
        informer.start()
        try:
            await asyncio.Event().wait()  # until cancelled (the router's shutdown)
        finally:
            informer.stop()
            self.api.close()


def _short_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<table>'}: {e['msg']}" for e in exc.errors())
    return str(exc)
