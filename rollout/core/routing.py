"""The routing table and the routing decision: pure data and pure functions, no I/O.

A :class:`RoutingTable` says which model version decides for whom during a rollout::

    {"generation": 7, "stage": "canary", "candidate_weight": 5,
     "stable":    {"version": "v12", "url": "http://127.0.0.1:3001"},
     "candidate": {"version": "v13", "url": "http://127.0.0.1:3002"},
     "shadow": []}

Stages: ``stable`` (stable decides; the candidate, if named, only stays warm), ``shadow`` (stable decides, the
candidate scores the same request off the response path), ``canary`` / ``ab`` (a sticky split by
``candidate_weight`` percent), ``full`` (the candidate decides for everyone). Whenever the candidate decides, the
stable scores the same request in shadow (the *control shadow*): every candidate decision has its stable twin, so
the decision-rate shift and the outcome gates can be judged paired on exactly the candidate's traffic in every
stage, not by comparing two different sets of accounts; in ``full`` it also keeps the previous stable warm for a
one-step revert. ``shadow`` lists extra versions that score every request in shadow.

:meth:`RoutePlan.compile` turns a table into the routes of its arms once, when the table changes; per request only
:meth:`RoutePlan.route` runs: one keyed hash and an integer comparison.

Sticky assignment: ``blake2b(salt ‖ 0x1f ‖ entity key)`` read as a 64-bit integer is uniform on ``[0, 2**64)``; an
entity goes to the candidate when that integer is below ``weight / 100 · 2**64``. So an entity keeps its arm for
the whole stage, raising the weight only adds entities to the candidate (never moves one back), and the salt —
by default the (stable, candidate) pair — gives each rollout its own, independent choice of entities. The router
compiles every table with its secret sticky key (:func:`keyed_salt`: the salt is ``blake2b(table salt, key=key)``),
so the salt is secret too: nobody without the key can compute which accounts reach the candidate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Stage = Literal["stable", "shadow", "canary", "ab", "full"]
#: Which side of the rollout answered: the table's stable or its candidate.
Arm = Literal["stable", "candidate"]
#: What a call to a model service was for: answering the client, or a shadow comparison.
Role = Literal["decider", "shadow"]

STAGES: Final[tuple[Stage, ...]] = ("stable", "shadow", "canary", "ab", "full")
#: Stages in which the candidate receives no deciding traffic, and those in which it receives all of it.
_NO_CANDIDATE_TRAFFIC: Final[frozenset[str]] = frozenset({"stable", "shadow"})
_ALL_CANDIDATE_TRAFFIC: Final[frozenset[str]] = frozenset({"full"})
#: The 64-bit hash space the weight cuts.
HASH_SPACE: Final[int] = 1 << 64
PERCENT: Final[float] = 100.0
_SALT_SEPARATOR: Final[bytes] = b"\x1f"
_BLAKE2B_MAX_KEY: Final[int] = 64
_KEYED_SALT_BYTES: Final[int] = 32
#: BLAKE2b personalisation of the keyed salt (a key used for nothing else still gets its own domain).
_SALT_PERSON: Final[bytes] = b"fw-sticky"
_VERSION_PATTERN: Final[str] = r"^[A-Za-z0-9][A-Za-z0-9._:+@-]*$"
_MAX_VERSION_CHARS: Final[int] = 128
_MAX_SALT_CHARS: Final[int] = 256
_URL_SCHEMES: Final[frozenset[str]] = frozenset({"http", "https"})


class VersionEndpoint(BaseModel):
    """One model version and the base URL of the service that runs it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str = Field(..., min_length=1, max_length=_MAX_VERSION_CHARS, pattern=_VERSION_PATTERN)
    url: str = Field(..., description="Base URL, e.g. http://127.0.0.1:3001 (no query, no fragment).")

    @field_validator("url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in _URL_SCHEMES or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL with a host")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or a fragment")
        return value.strip().rstrip("/")


class RoutingTable(BaseModel):
    """Who decides and who shadows, at which weight; validated as a whole.

    ``candidate_weight`` may be omitted where the stage fixes it (0 for ``stable``/``shadow``, 100 for ``full``);
    a value that contradicts the stage is rejected rather than silently ignored. How large a canary may be is the
    policy's business: the table accepts any weight in [0, 100].
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    generation: int = Field(0, ge=0, description="Set by the publisher; a router refuses an older generation.")
    stage: Stage = "stable"
    stable: VersionEndpoint
    candidate: VersionEndpoint | None = None
    candidate_weight: float = Field(..., ge=0.0, le=PERCENT, allow_inf_nan=False)
    shadow: tuple[VersionEndpoint, ...] = ()
    salt: str | None = Field(
        None, min_length=1, max_length=_MAX_SALT_CHARS, description="Sticky-hash salt; default: the version pair."
    )

    @model_validator(mode="before")
    @classmethod
    def _weight_from_stage(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("candidate_weight") is None:
            stage = data.get("stage", "stable")
            if stage in _NO_CANDIDATE_TRAFFIC:
                return {**data, "candidate_weight": 0.0}
            if stage in _ALL_CANDIDATE_TRAFFIC:
                return {**data, "candidate_weight": PERCENT}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RoutingTable:
        if self.stage != "stable" and self.candidate is None:
            raise ValueError(f"stage {self.stage!r} needs a candidate")
        if self.candidate is not None and self.candidate.version == self.stable.version:
            raise ValueError("candidate and stable must be different versions")
        if self.stage in _NO_CANDIDATE_TRAFFIC and self.candidate_weight != 0.0:
            raise ValueError(f"stage {self.stage!r} gives the candidate no traffic: candidate_weight must be 0")
        if self.stage in _ALL_CANDIDATE_TRAFFIC and self.candidate_weight != PERCENT:
            raise ValueError(f"stage {self.stage!r} gives the candidate all traffic: candidate_weight must be 100")
        _check_one_endpoint_per_version(self._named())
        return self

    def _named(self) -> tuple[VersionEndpoint, ...]:
        return (self.stable, *((self.candidate,) if self.candidate else ()), *self.shadow)

    def endpoints(self) -> tuple[VersionEndpoint, ...]:
        """Every endpoint the table names (stable, candidate, extra shadows), each version once."""
        return _unique_by_version(self._named())

    @property
    def effective_salt(self) -> str:
        """The sticky-hash salt: explicit, else the rollout's (stable, candidate) pair."""
        if self.salt is not None:
            return self.salt
        candidate = self.candidate.version if self.candidate else ""
        return f"{self.stable.version}->{candidate}"


def _check_one_endpoint_per_version(endpoints: Iterable[VersionEndpoint]) -> None:
    url_of: dict[str, str] = {}
    version_of: dict[str, str] = {}
    for endpoint in endpoints:
        if url_of.setdefault(endpoint.version, endpoint.url) != endpoint.url:
            raise ValueError(f"version {endpoint.version!r} is named with two URLs")
        if version_of.setdefault(endpoint.url, endpoint.version) != endpoint.version:
            raise ValueError(f"URL {endpoint.url!r} is named for two versions")


def _unique_by_version(endpoints: Iterable[VersionEndpoint]) -> tuple[VersionEndpoint, ...]:
    seen: set[str] = set()
    unique: list[VersionEndpoint] = []
    for endpoint in endpoints:
        if endpoint.version not in seen:
            seen.add(endpoint.version)
            unique.append(endpoint)
    return tuple(unique)


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes: the deciding endpoint, the fallback if it fails, the shadows."""

    arm: Arm
    decider: VersionEndpoint
    #: Answers instead when a deciding candidate fails (the stable); None when stable itself decides.
    fallback: VersionEndpoint | None
    shadows: tuple[VersionEndpoint, ...]


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """A table compiled for the request path: the route of each arm and the integer cut of the weight."""

    table: RoutingTable
    stable_route: Route
    candidate_route: Route | None
    #: Entities whose hash is below ``cut`` go to the candidate (0: nobody, ``HASH_SPACE``: everybody).
    cut: int
    salt: bytes

    @classmethod
    def compile(cls, table: RoutingTable, key: bytes | None = None) -> RoutePlan:
        """The plan of ``table``; with ``key`` (the router's secret sticky key) the salt is keyed."""
        salt = table.effective_salt.encode("utf-8")
        return cls(
            table=table,
            stable_route=_stable_route(table),
            candidate_route=_candidate_route(table),
            cut=weight_cut(table.candidate_weight),
            salt=keyed_salt(key, salt) if key else salt,
        )

    @property
    def stage(self) -> Stage:
        return self.table.stage

    def route(self, entity_key: str) -> Route:
        """The route of the entity; constant for a given (table, entity)."""
        if self.candidate_route is None or self.cut <= 0:
            return self.stable_route
        if self.cut >= HASH_SPACE or hash_point(self.salt, entity_key) < self.cut:
            return self.candidate_route
        return self.stable_route


def _stable_route(table: RoutingTable) -> Route:
    implicit = (table.candidate,) if table.stage == "shadow" and table.candidate else ()
    return Route(
        arm="stable",
        decider=table.stable,
        fallback=None,
        shadows=shadows_for(table.stable, (*implicit, *table.shadow)),
    )


def _candidate_route(table: RoutingTable) -> Route | None:
    if table.candidate is None or table.stage in _NO_CANDIDATE_TRAFFIC:
        return None
    return Route(
        arm="candidate",
        decider=table.candidate,
        fallback=table.stable,
        shadows=shadows_for(table.candidate, (table.stable, *table.shadow)),  # the control shadow
    )


def shadows_for(decider: VersionEndpoint, candidates: Iterable[VersionEndpoint]) -> tuple[VersionEndpoint, ...]:
    """The shadows of a request decided by ``decider``: each version once, never the decider itself."""
    return tuple(e for e in _unique_by_version(candidates) if e.version != decider.version)


def weight_cut(weight_percent: float) -> int:
    """The hash-space cut of a weight in percent; monotonic in the weight, exact at 0 and 100."""
    if weight_percent <= 0.0:
        return 0
    if weight_percent >= PERCENT:
        return HASH_SPACE
    return int(weight_percent / PERCENT * HASH_SPACE)


def keyed_salt(key: bytes, salt: bytes) -> bytes:
    """The per-rollout secret salt: BLAKE2b of the table's salt keyed with the router's sticky key (a key longer
    than BLAKE2b's 64 bytes is hashed to 64 first)."""
    mac_key = key if len(key) <= _BLAKE2B_MAX_KEY else hashlib.blake2b(key).digest()
    return hashlib.blake2b(salt, key=mac_key, digest_size=_KEYED_SALT_BYTES, person=_SALT_PERSON).digest()


def hash_point(salt: bytes, key: str) -> int:
    """A uniform point of ``[0, 2**64)`` for the key, fixed for a given salt."""
    digest = hashlib.blake2b(salt + _SALT_SEPARATOR + key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def hash_percent(salt: bytes, key: str) -> float:
    """The key's point as a percentage in ``[0, 100)`` (for inspection; routing compares integers)."""
    return hash_point(salt, key) / HASH_SPACE * PERCENT


@dataclass(frozen=True, slots=True)
class ComparisonPair:
    """How a (decider, shadow) pair of answers is labelled: ``stable`` / ``candidate`` follow the rollout.

    When the shadow is the table's stable (stage ``full``, the old version scoring behind the new), the pair is
    (stable = shadow, candidate = decider); otherwise (stable = decider, candidate = shadow). ``score_delta`` is
    always candidate − stable, so a series keeps its sign across stages.
    """

    stable: str
    candidate: str
    shadow_is_stable: bool

    def score_delta(self, decider_score: float, shadow_score: float) -> float:
        if self.shadow_is_stable:
            return decider_score - shadow_score
        return shadow_score - decider_score


def comparison_pair(decider_version: str, shadow_version: str, table_stable_version: str) -> ComparisonPair:
    if shadow_version == table_stable_version:
        return ComparisonPair(stable=shadow_version, candidate=decider_version, shadow_is_stable=True)
    return ComparisonPair(stable=decider_version, candidate=shadow_version, shadow_is_stable=False)
