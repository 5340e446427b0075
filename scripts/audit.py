"""The dependency audit of `make test`: every lock in locks/ against the advisories the package registry publishes.

Two sources, both PyPI's own JSON API (nothing but the package registry is needed):

1. pip-audit's default ``pypi`` service (``pip-audit -r <lock> --require-hashes --disable-pip``): PyPI's advisories
   of each pinned release (``/pypi/<name>/<version>/json``). Where that endpoint does not answer, pip-audit skips
   the package ("could not be audited") and still prints "No known vulnerabilities found" — so the skips are
   counted here and said out loud instead.
2. PyPI's project JSON (``/pypi/<name>/json``), which answers where the per-release one may not: whether the pinned
   release was yanked, and — when the pin is the project's newest release — that release's advisories.

Exit 1 when a pinned release has an advisory or was yanked; 0 otherwise. When some pins could be checked against no
advisory database, the report says which and how many, and the lock and the pyproject floors stay as they are.

Usage: python scripts/audit.py [locks/*.txt]   (prints a JSON summary last)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx

ROOT: Final[Path] = Path(__file__).resolve().parents[1]
PIP_AUDIT: Final[Path] = Path(sys.executable).parent / "pip-audit"
PROJECT_JSON: Final[str] = "https://pypi.org/pypi/{name}/json"
PIN: Final[re.Pattern[str]] = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", re.MULTILINE)
HTTP_TIMEOUT_S: Final[float] = 60.0
PIP_AUDIT_TIMEOUT_S: Final[float] = 600.0


def pins(lock_text: str) -> dict[str, str]:
    """``name → version`` of every ``name==version`` line of a requirements lock (names normalised)."""
    return {normalise(name): version for name, version in PIN.findall(lock_text)}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class PipAuditResult:
    """What pip-audit said about one lock."""

    vulnerable: dict[str, list[str]] = field(default_factory=dict)  # name → advisory IDs
    audited: set[str] = field(default_factory=set)
    skipped: dict[str, str] = field(default_factory=dict)  # name → reason
    error: str = ""


def parse_pip_audit(report: Mapping[str, Any]) -> PipAuditResult:
    """pip-audit's ``--format json`` report, split into vulnerable, audited and skipped packages."""
    result = PipAuditResult()
    for dep in report.get("dependencies", []):
        name = normalise(str(dep["name"]))
        if dep.get("skip_reason"):
            result.skipped[name] = str(dep["skip_reason"])
            continue
        result.audited.add(name)
        vulns = [str(v["id"]) for v in dep.get("vulns", [])]
        if vulns:
            result.vulnerable[name] = vulns
    return result


def run_pip_audit(lock: Path) -> PipAuditResult:
    argv = [str(PIP_AUDIT), "-r", str(lock), "--require-hashes", "--disable-pip", "--format", "json",
            "--progress-spinner", "off"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=PIP_AUDIT_TIMEOUT_S, check=False)
    try:
        return parse_pip_audit(json.loads(done.stdout))
    except json.JSONDecodeError:
        return PipAuditResult(error=(done.stderr or done.stdout).strip()[-500:])


@dataclass(frozen=True)
class ProjectFinding:
    """What PyPI's project JSON says about one pinned release."""

    name: str
    version: str
    reachable: bool
    latest: str = ""
    yanked: bool = False
    yanked_reason: str = ""
    #: Advisory IDs of the pinned release; None when the project JSON cannot tell (the pin is not the newest).
    advisories: tuple[str, ...] | None = None


def project_finding(name: str, version: str, document: Mapping[str, Any] | None) -> ProjectFinding:
    """The finding for ``name==version`` from the project's JSON document (None: it could not be fetched)."""
    if document is None:
        return ProjectFinding(name, version, reachable=False)
    latest = str(document.get("info", {}).get("version", ""))
    files = document.get("releases", {}).get(version, [])
    yanked = bool(files) and all(bool(f.get("yanked")) for f in files)
    reason = next((str(f.get("yanked_reason") or "") for f in files if f.get("yanked")), "")
    advisories = None
    if latest == version:
        advisories = tuple(str(v.get("id")) for v in document.get("vulnerabilities", []) if not v.get("withdrawn"))
    return ProjectFinding(name, version, True, latest, yanked, reason, advisories)


def fetch_project(client: httpx.Client, name: str) -> Mapping[str, Any] | None:
    try:
        response = client.get(PROJECT_JSON.format(name=name))
    except httpx.HTTPError:
        return None
    if response.status_code != httpx.codes.OK:
        return None
    document: Mapping[str, Any] = response.json()
    return document


def project_findings(pinned: Iterable[tuple[str, str]]) -> list[ProjectFinding]:
    """One finding per pin; each project's JSON fetched once."""
    pairs = sorted(set(pinned))
    names = sorted({name for name, _ in pairs})
    with httpx.Client(timeout=HTTP_TIMEOUT_S, follow_redirects=True) as client, ThreadPoolExecutor(8) as pool:
        documents = dict(zip(names, pool.map(lambda name: fetch_project(client, name), names), strict=True))
    return [project_finding(n, v, documents[n]) for n, v in pairs]


Pin = tuple[str, str]  # (normalised name, version)


@dataclass
class Summary:
    locks: list[str]
    pins: int
    vulnerable: dict[str, list[str]]
    yanked: dict[str, str]
    checked: list[str]
    unchecked: list[str]
    unreachable: list[str]
    pip_audit_errors: dict[str, str]
    seconds: float

    @property
    def failed(self) -> bool:
        return bool(self.vulnerable or self.yanked)


def _text(pin: Pin) -> str:
    return f"{pin[0]}=={pin[1]}"


def summarise(
    locks: Mapping[str, Mapping[str, str]],
    audits: Mapping[str, PipAuditResult],
    findings: Iterable[ProjectFinding],
    seconds: float,
) -> Summary:
    """One verdict over every lock: ``locks`` maps each lock's path to its pins, ``audits`` to pip-audit's result."""
    every: set[Pin] = {(n, v) for pinned in locks.values() for n, v in pinned.items()}
    vulnerable: dict[str, list[str]] = {}
    audited: set[Pin] = set()
    for lock, result in audits.items():
        pinned = locks[lock]
        audited |= {(n, pinned[n]) for n in result.audited if n in pinned}
        for name, ids in result.vulnerable.items():
            vulnerable.setdefault(_text((name, pinned.get(name, "?"))), []).extend(ids)
    yanked: dict[str, str] = {}
    unreachable: list[str] = []
    for f in findings:
        pin = (f.name, f.version)
        if not f.reachable:
            unreachable.append(_text(pin))
        if f.yanked:
            yanked[_text(pin)] = f.yanked_reason or "yanked"
        if f.advisories:
            vulnerable.setdefault(_text(pin), []).extend(f.advisories)
        if f.advisories is not None:
            audited.add(pin)
    errors = {lock: r.error for lock, r in audits.items() if r.error}
    return Summary(
        locks=sorted(locks),
        pins=len(every),
        vulnerable={k: sorted(set(v)) for k, v in vulnerable.items()},
        yanked=yanked,
        checked=sorted(_text(p) for p in every & audited),
        unchecked=sorted(_text(p) for p in every - audited),
        unreachable=sorted(unreachable),
        pip_audit_errors=errors,
        seconds=round(seconds, 1),
    )


def report(summary: Summary) -> str:
    lines = [f"audit: {summary.pins} pinned releases in {', '.join(summary.locks)} ({summary.seconds} s)"]
    lines += [f"  ADVISORY {pin}: {', '.join(ids)}" for pin, ids in sorted(summary.vulnerable.items())]
    lines += [f"  YANKED {pin}: {reason}" for pin, reason in sorted(summary.yanked.items())]
    lines += [f"  pip-audit failed on {lock}: {error}" for lock, error in summary.pip_audit_errors.items()]
    lines.append(f"  advisories checked for {len(summary.checked)} of {summary.pins} pins")
    if summary.unchecked:
        lines.append(
            f"  NO ADVISORY DATABASE REACHABLE for {len(summary.unchecked)} pins: PyPI's per-release JSON (pip-audit's "
            "'pypi' service) did not answer for them and they are not their project's newest release; they are "
            "checked for yanking only. The locks and the pyproject floors stay as they are."
        )
        lines.append(f"    unchecked: {' '.join(summary.unchecked)}")
    if summary.unreachable:
        lines.append(f"  PyPI did not answer for {len(summary.unreachable)} projects: {', '.join(summary.unreachable)}")
    lines.append("audit: FAILED" if summary.failed else "audit: passed (no advisory or yanked release found)")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    paths = [Path(a).resolve() for a in argv] or sorted((ROOT / "locks").glob("*.txt"))
    started = time.monotonic()
    locks = {str(p.relative_to(ROOT)): pins(p.read_text(encoding="utf-8")) for p in paths}
    with ThreadPoolExecutor(len(paths)) as pool:
        audits = dict(zip(locks, pool.map(run_pip_audit, paths), strict=True))
    findings = project_findings((n, v) for pinned in locks.values() for n, v in pinned.items())
    summary = summarise(locks, audits, findings, time.monotonic() - started)
    print(report(summary))
    counts = {"pins": summary.pins, "checked": len(summary.checked), "unchecked": len(summary.unchecked)}
    found = {"vulnerable": summary.vulnerable, "yanked": summary.yanked}
    print(json.dumps({**counts, **found, "seconds": summary.seconds}))
    return 1 if summary.failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
