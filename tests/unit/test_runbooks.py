"""runbooks/ and deploy/alertmanager/: every alert has its page and every page its alert; links resolve; the PromQL
on each page parses (promtool) and reads series that exist; the Alertmanager example passes ``amtool
check-config`` and routes each alert of rules.yml where its labels say (``amtool config routes test``)."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import RetrainWebhookSettings
from tests.unit.test_dashboard_json import known_series, promtool_check, series_names

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = ROOT / "runbooks"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
#: Pages that are procedures, not alerts.
PROCEDURES = frozenset(
    {"README.md", "rollback.md", "escalation.md", "oncall-handoff.md", "postmortem-template.md", "retraining.md"}
)
SECTIONS = ("## What it means", "## Confirm", "## Act", "## Roll back", "## Escalate")
SEVERITIES = frozenset({"critical", "warning"})
LAYERS = frozenset({"health", "input_drift", "output_drift", "outcome", "rollout", "retraining"})
RETRAIN_LAYERS = frozenset(RetrainWebhookSettings().trigger_layers)
RETRAIN_IGNORED = RetrainWebhookSettings().ignored_alerts
RETRAIN_PATH = "/hooks/alertmanager"
AMTOOL = Path("/usr/bin/amtool")


def _alerts() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def _page(name: str) -> str:
    return (RUNBOOKS / f"{name}.md").read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    start = text.index(heading) + len(heading)
    following = [text.find(h, start) for h in SECTIONS if text.find(h, start) != -1]
    return text[start : min(following, default=len(text))]


def _blocks(text: str, language: str) -> list[str]:
    return [b.strip() for b in re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)]


ALERTS = _alerts()
ALERT_NAMES = [a["alert"] for a in ALERTS]


# --------------------------------------------------------------------------------------------------- coverage


def test_rules_have_alerts_for_every_layer() -> None:
    assert {a["labels"]["layer"] for a in ALERTS} == LAYERS
    assert len(ALERT_NAMES) == len(set(ALERT_NAMES))


@pytest.mark.parametrize("alert", ALERTS, ids=ALERT_NAMES)
def test_every_alert_points_to_its_existing_runbook(alert: dict[str, Any]) -> None:
    url = alert["annotations"]["runbook_url"]
    assert url == f"runbooks/{alert['alert']}.md"
    assert (ROOT / url).is_file()
    assert alert["labels"]["severity"] in SEVERITIES
    assert alert["labels"]["layer"] in LAYERS


def test_every_runbook_page_belongs_to_an_alert_or_is_a_procedure() -> None:
    pages = {p.name for p in RUNBOOKS.glob("*.md")}
    assert pages >= PROCEDURES
    orphans = pages - PROCEDURES - {f"{name}.md" for name in ALERT_NAMES}
    assert not orphans, f"runbooks without an alert: {sorted(orphans)}"
    assert not [p for p in RUNBOOKS.iterdir() if p.suffix != ".md"]


def test_the_index_lists_every_page() -> None:
    index = (RUNBOOKS / "README.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(([^)#]+\.md)\)", index))
    assert linked == {p.name for p in RUNBOOKS.glob("*.md")} - {"README.md"}


def test_every_local_link_in_the_runbooks_resolves() -> None:
    for page in RUNBOOKS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


# --------------------------------------------------------------------------------------------------- content


@pytest.mark.parametrize("alert", ALERTS, ids=ALERT_NAMES)
def test_alert_page_has_every_section_and_matches_the_rule(alert: dict[str, Any]) -> None:
    text = _page(alert["alert"])
    assert text.startswith(f"# {alert['alert']}\n")
    positions = [text.find(heading) for heading in SECTIONS]
    assert -1 not in positions and positions == sorted(positions), positions
    assert f"**Severity:** {alert['labels']['severity']}" in text
    assert f"**Layer:** {alert['labels']['layer']}" in text
    assert all(_section(text, h).strip() for h in SECTIONS)


@pytest.mark.parametrize("alert", ALERTS, ids=ALERT_NAMES)
def test_alert_page_says_how_to_roll_back_and_whom_to_call(alert: dict[str, Any]) -> None:
    text = _page(alert["alert"])
    assert "[rollback.md](rollback.md)" in _section(text, "## Roll back")
    assert "[escalation.md](escalation.md)" in _section(text, "## Escalate")


def test_pages_of_alerts_on_a_bad_model_give_the_one_revert_command() -> None:
    model_layers = {"input_drift", "output_drift", "outcome"}
    for alert in ALERTS:
        if alert["labels"]["layer"] in model_layers and alert["alert"] != "FraudwatchLabelsStalled":
            assert "rolloutctl revert" in _section(_page(alert["alert"]), "## Roll back"), alert["alert"]


def test_confirm_sections_query_prometheus_with_valid_promql_on_existing_series(tmp_path: Path) -> None:
    exprs: list[str] = []
    for name in ALERT_NAMES:
        found = _blocks(_section(_page(name), "## Confirm"), "promql")
        assert found, f"{name}: no PromQL to confirm with"
        exprs += found
    exprs += _blocks((RUNBOOKS / "rollback.md").read_text(encoding="utf-8"), "promql")
    promtool_check(exprs, tmp_path)
    missing = {n for e in exprs for n in series_names(e)} - known_series()
    assert not missing, sorted(missing)


def test_rolloutctl_commands_in_the_runbooks_exist() -> None:
    from rollout.cli.main import build_parser

    parser = build_parser(plugin=False)
    (subcommands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    commands = set(subcommands._name_parser_map)
    used: set[str] = set()
    for page in RUNBOOKS.glob("*.md"):
        used.update(re.findall(r"rolloutctl ([a-z]+)", page.read_text(encoding="utf-8")))
    assert {"revert", "status"} <= used
    assert used <= set(commands), sorted(used - set(commands))


def test_rollback_procedure_is_one_command_with_its_verification() -> None:
    text = (RUNBOOKS / "rollback.md").read_text(encoding="utf-8")
    shell = _blocks(text, "sh")
    assert shell[0].startswith("rolloutctl revert --reason")
    assert len(shell[0].splitlines()) == 1
    assert "kubectl modelrollout revert" in shell[1]
    assert "minute" in text and "benchmarks/" in text
    assert "rolloutctl status" in text


def test_postmortem_template_asks_which_evaluation_gap_let_it_ship() -> None:
    text = (RUNBOOKS / "postmortem-template.md").read_text(encoding="utf-8")
    assert re.search(r"which evaluation gap let this issue ship\?", text, flags=re.IGNORECASE)
    for heading in ("## Impact", "## Timeline", "## Detection", "## Evaluation gap", "## Action items"):
        assert heading in text


def test_retraining_page_matches_the_code() -> None:
    """Its outcome table is RetrainOutcome with the CLI's exit codes, its queries read the receiver's series, its
    fraudwatch commands and options exist, and it names every alert the receiver ignores."""
    from prometheus_client import CollectorRegistry

    from service.cli.main import RETRAIN_EXIT_CODES
    from service.cli.main import build_parser as fraudwatch_parser
    from service.retraining.outcomes import RetrainOutcome
    from service.retraining.webhook import WebhookMetrics

    text = (RUNBOOKS / "retraining.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (\d+) \|", text, flags=re.MULTILINE))
    assert rows == {outcome.value: str(int(RETRAIN_EXIT_CODES[outcome.value])) for outcome in RetrainOutcome}
    registry = CollectorRegistry()
    WebhookMetrics(registry)
    exported = {f"{family.name}_total" for family in registry.collect() if family.type == "counter"}
    exprs = _blocks(text, "promql")
    assert exprs and {n for e in exprs for n in series_names(e)} <= exported
    (subcommands,) = [a for a in fraudwatch_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    lines = re.findall(r"^\s*fraudwatch ((?:retrain|recalibrate) [^#\n]*)", text, flags=re.MULTILINE)
    assert {line.split()[0] for line in lines} == {"retrain", "recalibrate"}
    for line in lines:
        command, *words = line.split()
        known = {o for action in subcommands.choices[command]._actions for o in action.option_strings}
        used = {w for w in words if w.startswith("--")}
        assert used <= known, (line, used - known)
    for alert in RetrainWebhookSettings().ignored_alerts:
        assert alert in text


def test_escalation_and_handoff_name_roles_and_steps() -> None:
    escalation = (RUNBOOKS / "escalation.md").read_text(encoding="utf-8")
    assert all(s in escalation for s in ("`critical`", "`warning`", "ML owner", "secondary", "rolloutctl revert"))
    handoff = (RUNBOOKS / "oncall-handoff.md").read_text(encoding="utf-8")
    assert handoff.count("- [ ]") >= 10
    assert "rolloutctl status" in handoff


# --------------------------------------------------------------------------------------------------- Alertmanager


def _amtool(*args: str) -> subprocess.CompletedProcess[str]:
    if not AMTOOL.exists():
        pytest.fail(f"{AMTOOL} is missing: install Debian's prometheus-alertmanager package")
    return subprocess.run([str(AMTOOL), *args], capture_output=True, text=True, timeout=60, check=False)


def test_alertmanager_config_passes_amtool_check_config() -> None:
    result = _amtool("check-config", str(ALERTMANAGER))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_retrain_receiver_is_the_retraining_services_webhook() -> None:
    config = yaml.safe_load(ALERTMANAGER.read_text(encoding="utf-8"))
    (receiver,) = [r for r in config["receivers"] if r["name"] == "retrain-webhook"]
    (hook,) = receiver["webhook_configs"]
    assert hook["url"].endswith(RETRAIN_PATH)
    assert hook["http_config"]["authorization"]["type"] == "Bearer"
    (route,) = [r for r in config["route"]["routes"] if r["receiver"] == "retrain-webhook"]
    (excluded,) = [m for m in route["matchers"] if m.startswith("alertname !~")]
    assert excluded.split('"')[1].split("|") == list(RETRAIN_IGNORED)  # the receiver ignores the same alerts
    assert set(RETRAIN_IGNORED) <= set(ALERT_NAMES)


def _expected_receivers(labels: dict[str, str]) -> list[str]:
    receivers = ["oncall-pager"] if labels["severity"] == "critical" else []
    retrains = labels["layer"] in RETRAIN_LAYERS and labels["alertname"] not in RETRAIN_IGNORED
    receivers += ["retrain-webhook"] if retrains else []
    return [*receivers, "fraudwatch-team"]


@pytest.mark.parametrize("alert", ALERTS, ids=ALERT_NAMES)
def test_each_alert_is_routed_by_its_severity_and_layer(alert: dict[str, Any]) -> None:
    labels = {"alertname": alert["alert"], **alert["labels"]}
    result = _amtool(
        "config", "routes", "test", f"--config.file={ALERTMANAGER}", *(f"{k}={v}" for k, v in labels.items())
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().split(",") == _expected_receivers(labels)
