"""A seeded, deterministic generator of refund requests with realistic fraud patterns.

Legitimate traffic
    Accounts of log-normally distributed age (median ≈ 2 years; :data:`FRESH_ACCOUNT_SHARE` are new customers,
    days to weeks old) ask for refunds at a low rate. Amounts follow category-specific log-normal prices with retail
    endings: most end in ``.99``, some are whole dollars, the rest arbitrary cents. Each request carries the IP
    address (``ip_address``) and device (``device_id``) it came from: a household's IP (1–3 accounts), now and then
    a campus or carrier NAT shared by many accounts over a day; each account its own device, some household members
    one shared device. ``ipAccounts`` is what the client reports for the IP (its own count, not derived from the
    traffic). About 5 % of descriptions are missing.

Fraud patterns (≈ ``fraud_rate`` of all requests, ~1 % by default)
    ``serial_refunder`` — a small set of established accounts with a long refund history (refund rate several
    times the norm) claiming food or perishables "never arrived" / "spoiled" for modest amounts.
    ``bot_farm`` — freshly created accounts (days old) behind a few IPs shared by dozens of accounts, claiming
    gift cards and electronics at round amounts (25.00, 50.00, 100.00), often with no description.
    ``high_value`` — ordinary-looking accounts of moderate age claiming one expensive electronics item far above
    their usual basket.
    A few fraud rows look like ordinary traffic and a few legitimate rows look odd, so the task is not trivial.

Drift scenario (``drift=True``)
    ``burst_farm`` — a bot farm working in bursts (:data:`BURST_SHARE` of the fraud): within 15–60 minutes, 15–45
    refunds from about 7–35 freshly created accounts (days old, no refund history), 1–3 each, all through the farm's 2–3
    IPs and 3–5 devices; ordinary items at retail prices, and the client reports 1–3 accounts per IP (residential
    proxies look like homes). Statically they look like the platform's new customers; what gives them away is
    velocity: dozens of accounts on one IP or device within the hour. Every burst is a new farm (new accounts,
    IPs and devices), so a model never saw the next one's identities.
    A few fraud rows look like ordinary traffic and a few legitimate rows look odd, so the task is not trivial.

Drift scenario (``drift=True``)
    ``new_bot_farm`` — from ``drift_start`` (a fraction of the window) a new farm appears that a model trained
    before it has not seen: bought, aged accounts (1–3 years) with a moderately high refund history behind
    residential proxies (4–7 accounts per IP), claiming apparel and homewares at retail ``.99`` prices.

Every row also carries the account's refund history before the window (``prior_refunds_base``,
``avg_amount_base``) from which point-in-time aggregates are computed, and a label delay (chargebacks take
days to weeks) for feedback simulations. Rows are in time order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import pandas as pd

PATTERNS: Final[tuple[str, ...]] = (
    "legit",
    "serial_refunder",
    "bot_farm",
    "high_value",
    "burst_farm",
    "new_bot_farm",
)
#: Share of each built-in fraud pattern among the fraud rows drawn one by one (before drift).
FRAUD_MIX: Final[dict[str, float]] = {"serial_refunder": 0.40, "bot_farm": 0.35, "high_value": 0.25}
#: Share of all fraud that comes in bot-farm bursts (``burst_farm``), on top of the rows drawn one by one.
BURST_SHARE: Final[float] = 0.25
#: Share of accounts created days to weeks before the window (legitimate new customers).
FRESH_ACCOUNT_SHARE: Final[float] = 0.05
#: Share of legitimate requests that come through a campus or carrier NAT, and how many NAT addresses there are.
NAT_SHARE: Final[float] = 0.03
NAT_IPS: Final[int] = 6
#: Share of accounts that are serial refunders (at least two, so tiny data sets still have the pattern).
SERIAL_ACCOUNT_SHARE: Final[float] = 0.006
#: During drift, this share of fraud rows comes from the new farm (on top of the usual mix).
DRIFT_FRAUD_SHARE: Final[float] = 0.45

_DESCRIPTIONS: Final[dict[str, tuple[str, ...]]] = {
    "food_perishable": (
        "Pad Thai with tofu",
        "Large pepperoni pizza",
        "Sushi platter",
        "Chicken curry takeout",
        "Weekly grocery box",
        "Fresh fruit basket",
        "Cheese and bread bundle",
        "Salmon sushi rolls",
    ),
    "electronics": (
        "Wireless headphones",
        "Smartphone case and charger",
        "Bluetooth speaker",
        "Laptop 14 inch",
        "Gaming console",
        "4K monitor",
        "Noise cancelling earbuds",
        "Smartwatch",
    ),
    "apparel": (
        "Running shoes",
        "Denim jeans",
        "Winter jacket",
        "Cotton t-shirt pack",
        "Summer dress",
        "Leather boots",
        "Wool sweater",
        "Hoodie size M",
    ),
    "home": (
        "Table lamp",
        "Memory foam pillow",
        "Kitchen blender",
        "Cotton towel set",
        "Office chair",
        "Ceramic mug set",
        "Area rug",
        "Robot vacuum",
    ),
    "gift_card": ("Gift card $50", "Store gift card", "Digital voucher", "Prepaid card"),
    "other": ("Board game", "Paperback novel", "Yoga mat", "Dog food", "Garden hose", "Phone plan top-up"),
}
#: Legitimate category mix and log-normal price parameters (median dollars, sigma).
_LEGIT_CATEGORIES: Final[dict[str, tuple[float, float, float]]] = {
    "food_perishable": (0.28, 28.0, 0.45),
    "electronics": (0.14, 90.0, 0.9),
    "apparel": (0.22, 45.0, 0.6),
    "home": (0.16, 40.0, 0.7),
    "gift_card": (0.04, 50.0, 0.5),
    "other": (0.16, 25.0, 0.7),
}
_FRAUD_TEMPLATES: Final[dict[str, tuple[str, ...]]] = {
    "serial_refunder": (
        "Pad Thai with tofu never arrived",
        "Pizza arrived cold and spoiled",
        "Groceries rotten on arrival",
        "Meal missing from delivery",
        "Sushi expired",
    ),
    "bot_farm": ("Gift card not received", "Digital voucher invalid", "Phone not delivered", "Prepaid card"),
    "high_value": ("Laptop arrived damaged", "Gaming console not working", "4K television cracked screen"),
    "new_bot_farm": ("Winter jacket wrong size", "Leather boots damaged", "Robot vacuum faulty", "Area rug torn"),
}


@dataclass(frozen=True)
class SyntheticConfig:
    n_accounts: int = 20_000
    n_requests: int = 120_000
    days: int = 180
    fraud_rate: float = 0.01
    seed: int = 7
    drift: bool = False
    drift_start: float = 0.5
    start: str = "2026-01-01"
    #: Share of the fraud that comes in bot-farm bursts (0: every fraud row drawn one by one, as before issue 15).
    burst_share: float = BURST_SHARE


def generate(config: SyntheticConfig) -> pd.DataFrame:
    """Generate ``config.n_requests`` refund requests in time order, deterministically for a seed."""
    rng = np.random.default_rng(config.seed)
    accounts = _accounts(rng, config.n_accounts)
    n_burst = round(config.n_requests * config.fraud_rate * config.burst_share)
    n_single = config.n_requests - n_burst
    times = np.sort(rng.uniform(0.0, config.days * 86_400.0, n_single))
    drift_at = config.drift_start * config.days * 86_400.0 if config.drift else np.inf
    single_rate = max(config.fraud_rate * config.n_requests - n_burst, 0.0) / n_single
    pattern = _assign_patterns(rng, times, single_rate, drift_at)
    single = _fill_rows(rng, accounts, pattern)
    single.insert(0, "timestamp", times)
    bursts = _bursts(rng, n_burst, config.days * 86_400.0)
    # an empty frame's object columns would turn the numeric ones to object in concat (None, not NaN, downstream)
    frame = pd.concat([single, bursts], ignore_index=True) if len(bursts) else single
    frame = frame.sort_values("timestamp", kind="mergesort").reset_index(drop=True)
    frame["timestamp"] = pd.Timestamp(config.start) + pd.to_timedelta(frame["timestamp"].to_numpy(), unit="s")
    frame.insert(0, "request_id", [f"req-{config.seed}-{i:07d}" for i in range(config.n_requests)])
    frame["is_fraud"] = (frame["pattern"] != "legit").astype(np.int8)
    _add_noise(rng, frame)
    frame["label_delay_hours"] = _label_delays(rng, frame["is_fraud"].to_numpy())
    return frame


def _accounts(rng: np.random.Generator, n: int) -> pd.DataFrame:
    years = np.clip(rng.lognormal(mean=np.log(2.0), sigma=0.9, size=n), 0.02, 20.0)
    fresh = rng.random(n) < FRESH_ACCOUNT_SHARE
    years = np.where(fresh, rng.uniform(0.003, 0.1, n), years)
    prior = rng.poisson(0.35 * years)
    avg_amount = np.clip(rng.lognormal(np.log(45.0), 0.5, n), 5.0, 800.0)
    serial = np.zeros(n, dtype=bool)
    serial[rng.choice(n, size=max(2, round(SERIAL_ACCOUNT_SHARE * n)), replace=False)] = True
    prior = np.where(serial, rng.integers(8, 40, n), prior)
    activity = rng.pareto(1.5, n) + 1.0
    household = _households(rng, n)
    # Some members of a household share its first member's device.
    first_member = np.searchsorted(household, household, side="left")
    shares_device = rng.random(n) < 0.15
    device = np.where(shares_device, first_member, np.arange(n))
    return pd.DataFrame(
        {
            "account_id": [f"acct-{i:06d}" for i in range(n)],
            "years": years,
            "prior": prior.astype(float),
            "avg_amount": avg_amount,
            "serial": serial,
            "weight": activity / activity.sum(),
            "ip": [f"ip-h{h:06d}" for h in household],
            "device": [f"dev-{d:06d}" for d in device],
        }
    )


def _households(rng: np.random.Generator, n: int) -> npt.NDArray[np.int64]:
    """Household number of each account (consecutive accounts, 1 + Poisson(0.6) per household)."""
    sizes = 1 + rng.poisson(0.6, n)
    return np.repeat(np.arange(n), sizes)[:n].astype(np.int64)


def _assign_patterns(
    rng: np.random.Generator, times: npt.NDArray[np.float64], fraud_rate: float, drift_at: float
) -> npt.NDArray[np.str_]:
    n = times.size
    is_fraud = rng.random(n) < fraud_rate
    names = list(FRAUD_MIX)
    base = rng.choice(names, size=n, p=list(FRAUD_MIX.values()))
    drifted = (times >= drift_at) & (rng.random(n) < DRIFT_FRAUD_SHARE)
    # The new farm adds fraud on top of the usual rate, as a real new attack would.
    extra = (times >= drift_at) & (rng.random(n) < fraud_rate * DRIFT_FRAUD_SHARE)
    fraud_pattern = np.where(drifted, "new_bot_farm", base)
    pattern = np.where(is_fraud, fraud_pattern, "legit")
    return np.where(extra & ~is_fraud, "new_bot_farm", pattern).astype(np.str_)


def _fill_rows(rng: np.random.Generator, accounts: pd.DataFrame, pattern: npt.NDArray[np.str_]) -> pd.DataFrame:
    n = pattern.size
    legit_idx = rng.choice(len(accounts), size=n, p=accounts["weight"].to_numpy())
    serial_ids = np.flatnonzero(accounts["serial"].to_numpy())
    idx = np.where(pattern == "serial_refunder", rng.choice(serial_ids, size=n), legit_idx)
    acc = accounts.iloc[idx].reset_index(drop=True)
    nat = rng.random(n) < NAT_SHARE
    columns: dict[str, object] = {
        "account_id": acc["account_id"].to_numpy(dtype=object),
        "yearsActive": acc["years"].to_numpy().copy(),
        "prior_refunds_base": acc["prior"].to_numpy().copy(),
        "avg_amount_base": acc["avg_amount"].to_numpy().copy(),
        "ip_address": np.where(nat, [f"ip-nat-{k}" for k in rng.integers(0, NAT_IPS, n)], acc["ip"].to_numpy()),
        "device_id": acc["device"].to_numpy(dtype=object),
    }
    frame = pd.DataFrame(columns)
    category = rng.choice(list(_LEGIT_CATEGORIES), size=n, p=[v[0] for v in _LEGIT_CATEGORIES.values()])
    medians = np.array([_LEGIT_CATEGORIES[c][1] for c in category])
    sigmas = np.array([_LEGIT_CATEGORIES[c][2] for c in category])
    frame["amount"] = _retail_price(rng, rng.lognormal(np.log(medians), sigmas), charm=0.6, whole=0.15)
    frame["ipAccounts"] = _household_ips(rng, n)
    frame["itemDescription"] = [_pick(rng, _DESCRIPTIONS[c]) for c in category]
    frame["itemDescription"] = frame["itemDescription"].where(rng.random(n) >= 0.05, None)
    frame["pattern"] = pattern
    for name in ("bot_farm", "high_value", "new_bot_farm", "serial_refunder"):
        mask = pattern == name
        if mask.any():
            _apply_pattern(rng, frame, mask, name)
    return frame


def _apply_pattern(rng: np.random.Generator, frame: pd.DataFrame, mask: npt.NDArray[np.bool_], name: str) -> None:
    k = int(mask.sum())
    texts = [_pick(rng, _FRAUD_TEMPLATES[name]) for _ in range(k)]
    if name == "serial_refunder":
        frame.loc[mask, "amount"] = _retail_price(rng, rng.uniform(15.0, 120.0, k), charm=0.5, whole=0.2)
        frame.loc[mask, "ipAccounts"] = rng.integers(1, 3, k)
    elif name == "bot_farm":
        farm = rng.integers(0, 40, k)
        frame.loc[mask, "account_id"] = [f"bot-{f:02d}-{rng.integers(0, 10**6):06d}" for f in farm]
        frame.loc[mask, "ip_address"] = [f"ip-bot-{f:02d}" for f in farm]
        frame.loc[mask, "device_id"] = [f"dev-bot-{f:02d}-{rng.integers(0, 5)}" for f in farm]
        frame.loc[mask, "yearsActive"] = rng.uniform(0.0, 0.12, k)
        frame.loc[mask, "prior_refunds_base"] = rng.integers(0, 2, k).astype(float)
        frame.loc[mask, "avg_amount_base"] = np.nan
        frame.loc[mask, "amount"] = rng.choice([25.0, 50.0, 100.0, 150.0, 200.0], k)
        frame.loc[mask, "ipAccounts"] = rng.integers(8, 60, k)
        texts = [t if rng.random() > 0.4 else None for t in texts]  # type: ignore[misc]
    elif name == "high_value":
        frame.loc[mask, "yearsActive"] = rng.uniform(0.3, 6.0, k)
        frame.loc[mask, "amount"] = _retail_price(rng, rng.uniform(600.0, 3000.0, k), charm=0.5, whole=0.3)
        frame.loc[mask, "ipAccounts"] = rng.integers(1, 3, k)
    elif name == "new_bot_farm":
        frame.loc[mask, "account_id"] = [f"aged-{rng.integers(0, 10**6):06d}" for _ in range(k)]
        frame.loc[mask, "ip_address"] = [f"ip-proxy-{rng.integers(0, 200):03d}" for _ in range(k)]
        frame.loc[mask, "device_id"] = [f"dev-aged-{rng.integers(0, 10**6):06d}" for _ in range(k)]
        frame.loc[mask, "yearsActive"] = rng.uniform(1.0, 3.0, k)
        frame.loc[mask, "prior_refunds_base"] = rng.integers(4, 10, k).astype(float)
        frame.loc[mask, "avg_amount_base"] = rng.uniform(60.0, 120.0, k)
        frame.loc[mask, "amount"] = _retail_price(rng, rng.uniform(60.0, 250.0, k), charm=1.0, whole=0.0)
        frame.loc[mask, "ipAccounts"] = rng.integers(4, 8, k)
    frame.loc[mask, "itemDescription"] = pd.Series(texts, index=frame.index[mask], dtype=object)


def _bursts(rng: np.random.Generator, n_rows: int, window_s: float) -> pd.DataFrame:
    """``n_rows`` refunds of ``burst_farm`` bursts (see the module docstring), with their times in seconds."""
    parts: list[pd.DataFrame] = []
    farm = 0
    left = n_rows
    while left > 0:
        size = min(left, int(rng.integers(15, 46)))
        parts.append(_burst(rng, farm, size, window_s))
        left -= size
        farm += 1
    columns = ["timestamp", "account_id", "yearsActive", "prior_refunds_base", "avg_amount_base", "ip_address"]
    if not parts:
        return pd.DataFrame(columns=[*columns, "device_id", "amount", "ipAccounts", "itemDescription", "pattern"])
    return pd.concat(parts, ignore_index=True)


def _burst(rng: np.random.Generator, farm: int, size: int, window_s: float) -> pd.DataFrame:
    duration = rng.uniform(15.0, 60.0) * 60.0
    start = rng.uniform(0.0, max(window_s - duration, 0.0))
    n_accounts = max(1, min(size, round(size / rng.uniform(1.3, 2.2))))
    tag = f"{farm:03d}-{rng.integers(0, 10**6):06d}"
    owner = np.concatenate([np.arange(n_accounts), rng.integers(0, n_accounts, size - n_accounts)])
    ages = rng.uniform(0.003, 0.08, n_accounts)
    ips = [f"ip-farm-{tag}-{j}" for j in range(int(rng.integers(2, 4)))]
    devices = [f"dev-farm-{tag}-{j}" for j in range(int(rng.integers(3, 6)))]
    category = rng.choice(["apparel", "electronics", "home"], size=size)
    medians = np.array([_LEGIT_CATEGORIES[c][1] for c in category])
    sigmas = np.array([_LEGIT_CATEGORIES[c][2] for c in category])
    return pd.DataFrame(
        {
            "timestamp": start + np.sort(rng.uniform(0.0, duration, size)),
            "account_id": [f"fresh-{tag}-{a:02d}" for a in owner],
            "yearsActive": ages[owner],
            "prior_refunds_base": 0.0,
            "avg_amount_base": np.nan,
            "ip_address": [ips[int(j)] for j in rng.integers(0, len(ips), size)],
            "device_id": [devices[int(j)] for j in rng.integers(0, len(devices), size)],
            "amount": _retail_price(rng, rng.lognormal(np.log(medians), sigmas), charm=0.6, whole=0.15),
            "ipAccounts": 1 + np.minimum(rng.poisson(0.5, size), 2),
            "itemDescription": [_pick(rng, _DESCRIPTIONS[str(c)]) for c in category],
            "pattern": "burst_farm",
        }
    )


def _add_noise(rng: np.random.Generator, frame: pd.DataFrame) -> None:
    """Make the task realistic: some fraud looks ordinary, some legitimate traffic looks odd."""
    n = len(frame)
    odd_legit = (frame["is_fraud"].to_numpy() == 0) & (rng.random(n) < 0.004)
    frame.loc[odd_legit, "ipAccounts"] = rng.integers(6, 30, int(odd_legit.sum()))
    frame.loc[odd_legit, "amount"] = rng.choice([25.0, 50.0, 100.0, 400.0, 900.0], int(odd_legit.sum()))


def _retail_price(
    rng: np.random.Generator, raw: npt.NDArray[np.float64], charm: float, whole: float
) -> npt.NDArray[np.float64]:
    """Give prices retail endings: ``charm`` share end in .99, ``whole`` share in .00, the rest any cents."""
    dollars = np.maximum(np.floor(raw), 1.0)
    u = rng.random(raw.size)
    cents = np.where(u < charm, 0.99, np.where(u < charm + whole, 0.0, rng.integers(0, 100, raw.size) / 100.0))
    return np.round(np.where(cents == 0.99, dollars - 1.0 + 0.99, dollars + cents).clip(0.5), 2)


def _household_ips(rng: np.random.Generator, n: int) -> npt.NDArray[np.int64]:
    household = 1 + rng.poisson(0.5, n)
    nat = rng.random(n) < 0.02
    return np.where(nat, rng.integers(4, 26, n), household).astype(np.int64)


def _label_delays(rng: np.random.Generator, is_fraud: npt.NDArray[np.int8]) -> npt.NDArray[np.float64]:
    """Chargebacks arrive after days to weeks; legitimate outcomes are confirmed after a settlement window."""
    fraud_delay = rng.gamma(shape=2.0, scale=72.0, size=is_fraud.size)
    legit_delay = rng.uniform(24.0, 720.0, size=is_fraud.size)
    return np.round(np.where(is_fraud == 1, fraud_delay, legit_delay), 2).astype(np.float64)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(0, len(options)))]
