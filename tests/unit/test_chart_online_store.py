"""The chart's online store (issue 15): rendered by the real helm, and the Redis it deploys started the chart's own
way — its container's start script and ACL run against a real ``redis-server`` — serving the real store while
refusing what the model servers' user must not do."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from service.common.processes import free_port
from service.data import velocity as v
from service.data.online_store import open_online_store
from service.settings import OnlineStoreSettings
from tests.kits.chart import Helm, find, one
from tests.kits.redis import redis_binary

PASSWORD = "a-password-of-the-online-store"
FIXED = {"onlineStore": {"auth": {"password": PASSWORD}}}


@pytest.fixture(scope="module")
def deployed(helm: Helm, workdir: Path) -> list[dict[str, Any]]:
    return helm.template(FIXED, workdir)


def model_server(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, str]]:
    """The model-server pod template's spec and its container's plain env."""
    configmap = one(objects, "ConfigMap", "-model-server")
    spec = yaml.safe_load(configmap["data"]["pod-template.yaml"])["spec"]
    (container,) = spec["containers"]
    return spec, {e["name"]: e["value"] for e in container["env"] if "value" in e}


def router(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, str]]:
    """The router Deployment's pod spec and its container's plain env."""
    spec: dict[str, Any] = one(objects, "Deployment", "-router")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, {e["name"]: e["value"] for e in container["env"] if "value" in e}


def component_peers(rule: Mapping[str, Any], key: str) -> list[str]:
    selectors = [peer["podSelector"].get("matchLabels", {}) for peer in rule.get(key, []) if "podSelector" in peer]
    return [labels.get("app.kubernetes.io/component", "") for labels in selectors]


def policy_of(objects: list[dict[str, Any]], suffix: str) -> Mapping[str, Any]:
    spec: Mapping[str, Any] = one(objects, "NetworkPolicy", suffix)["spec"]
    return spec


def test_deploy_mode_runs_one_redis_the_model_servers_reach_with_a_mounted_password(
    deployed: list[dict[str, Any]],
) -> None:
    redis_deployment = one(deployed, "Deployment", "-online-store")
    service = one(deployed, "Service", "-online-store")
    spec, env = model_server(deployed)

    assert redis_deployment["spec"]["replicas"] == 1
    assert env["FW_SERVE__ONLINE_STORE__URL"] == f"redis://{service['metadata']['name']}:6379/0"
    assert PASSWORD not in yaml.safe_dump(spec)  # only the file's path, never the value, in the pod spec
    password_file = Path(env["FW_SERVE__ONLINE_STORE__PASSWORD_FILE"])
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "online-store-auth"]
    assert mount["readOnly"] is True and password_file.parent == Path(mount["mountPath"])
    assert env["FW_SERVE__ONLINE_STORE__KEY_PREFIX"] == "fw:v1:"
    (container,) = redis_deployment["spec"]["template"]["spec"]["containers"]
    assert PASSWORD not in yaml.safe_dump(redis_deployment)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["runAsNonRoot"] is True


def test_the_routers_write_labels_to_the_same_redis_with_the_mounted_password(deployed: list[dict[str, Any]]) -> None:
    """The routers' label feed writes each recorded fraud label to the store the model servers read: the same URL,
    key prefix and password file (a mounted Secret, never the value in the pod spec)."""
    _, served = model_server(deployed)
    spec, env = router(deployed)
    for key in ("URL", "PASSWORD_FILE", "KEY_PREFIX"):
        assert env[f"FW_ROLLOUT_ROUTER__ONLINE_STORE__{key}"] == served[f"FW_SERVE__ONLINE_STORE__{key}"]
    assert PASSWORD not in yaml.safe_dump(spec)
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "online-store-auth"]
    assert mount["readOnly"] is True
    assert Path(env["FW_ROLLOUT_ROUTER__ONLINE_STORE__PASSWORD_FILE"]).parent == Path(mount["mountPath"])
    (volume,) = [vol for vol in spec["volumes"] if vol["name"] == "online-store-auth"]
    assert volume["secret"]["secretName"].endswith("-online-store-auth")
    to_redis = [r for r in policy_of(deployed, "-router")["egress"] if component_peers(r, "to") == ["online-store"]]
    assert [r["ports"] for r in to_redis] == [[{"port": 6379, "protocol": "TCP"}]]


def test_only_model_servers_and_routers_reach_redis_and_model_servers_reach_only_its_port(
    deployed: list[dict[str, Any]],
) -> None:
    store = policy_of(deployed, "-online-store")
    (rule,) = store["ingress"]
    assert component_peers(rule, "from") == ["model-server", "router"]  # features and events; fraud labels
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    assert all(port["port"] == 53 for r in store["egress"] for port in r["ports"])  # DNS only
    model = policy_of(deployed, "-model-server")
    to_redis = [
        r
        for r in model["egress"]
        for p in r.get("to", [])
        if p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "online-store"
    ]
    assert [r["ports"] for r in to_redis] == [[{"port": 6379, "protocol": "TCP"}]]


def test_existing_mode_takes_your_redis_and_secret_and_deploys_none(helm: Helm, workdir: Path) -> None:
    egress_rule = {"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}], "ports": [{"port": 6380, "protocol": "TCP"}]}
    values: dict[str, Any] = {
        "onlineStore": {
            "mode": "existing",
            "url": "rediss://redis.shared:6380/2",
            "auth": {"existingSecret": "shared-redis", "existingSecretKey": "pw"},
            "egress": [egress_rule],
        }
    }
    objects = helm.template(values, workdir)
    spec, env = model_server(objects)

    assert find(objects, "Deployment", "-online-store") == [] and find(objects, "NetworkPolicy", "-online-store") == []
    assert [s for s in find(objects, "Secret") if "online-store" in s["metadata"]["name"]] == []
    assert env["FW_SERVE__ONLINE_STORE__URL"] == "rediss://redis.shared:6380/2"
    (volume,) = [vol for vol in spec["volumes"] if vol["name"] == "online-store-auth"]
    assert (volume["secret"]["secretName"], volume["secret"]["items"][0]["key"]) == ("shared-redis", "pw")
    egress = policy_of(objects, "-model-server")["egress"]
    assert egress_rule in egress
    router_spec, router_env = router(objects)
    assert router_env["FW_ROLLOUT_ROUTER__ONLINE_STORE__URL"] == "rediss://redis.shared:6380/2"
    (volume,) = [vol for vol in router_spec["volumes"] if vol["name"] == "online-store-auth"]
    assert (volume["secret"]["secretName"], volume["secret"]["items"][0]["key"]) == ("shared-redis", "pw")
    assert egress_rule in policy_of(objects, "-router")["egress"]


def test_embedded_mode_has_no_store_to_reach(helm: Helm, workdir: Path) -> None:
    objects = helm.template({"onlineStore": {"mode": "embedded"}}, workdir)
    spec, env = model_server(objects)
    assert "FW_SERVE__ONLINE_STORE__URL" not in env and "FW_SERVE__ONLINE_STORE__PASSWORD_FILE" not in env
    assert all(vol["name"] != "online-store-auth" for vol in spec["volumes"])
    assert find(objects, "Deployment", "-online-store") == []
    router_spec, router_env = router(objects)  # no store the router could reach: labels go nowhere
    assert not any(name.startswith("FW_ROLLOUT_ROUTER__ONLINE_STORE__") for name in router_env)
    assert all(vol["name"] != "online-store-auth" for vol in router_spec["volumes"])


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"onlineStore": {"mode": "existing"}}, "url"),
        ({"onlineStore": {"mode": "existing", "url": "redis://user:secret@redis:6379/0"}}, "url"),
        ({"onlineStore": {"mode": "cluster"}}, "mode"),
    ],
)
def test_bad_online_store_values_are_refused(helm: Helm, workdir: Path, values: dict[str, Any], complaint: str) -> None:
    assert complaint in helm.template_error(values, workdir)


# ------------------------------------------------------------------------------- the chart's Redis, started for real


@pytest.fixture(scope="module")
def charts_redis(deployed: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Redis container's start script, as rendered, run by /bin/sh with this machine's redis-server: the
    mounted Secret and /data become directories of the test, the port a free one. Yields its URL."""
    root = tmp_path_factory.mktemp("charts-redis")
    (container,) = one(deployed, "Deployment", "-online-store")["spec"]["template"]["spec"]["containers"]
    (script,) = container["args"]
    secret_dir, data_dir = root / "secret", root / "data"
    secret_dir.mkdir()
    data_dir.mkdir()
    (secret_dir / "password").write_text(PASSWORD, encoding="utf-8")
    port = free_port("127.0.0.1")
    script = (
        script.replace("/etc/fraudwatch/online-store", str(secret_dir))
        .replace("/data", str(data_dir))
        .replace("--port 6379", f"--port {port} --bind 127.0.0.1")
        .replace("exec redis-server", f"exec {redis_binary()}")
    )
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]}}
    with (root / "redis.log").open("ab") as log:
        process = subprocess.Popen(["/bin/sh", "-c", script], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 20.0
        while True:
            try:
                redis.Redis.from_url(url, password=PASSWORD).ping()
                break
            except redis.exceptions.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the chart's redis did not start: {(root / 'redis.log').read_text()[-2000:]}")
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_acl_keeps_only_the_passwords_hash(charts_redis: str, tmp_path: Path) -> None:
    acl = next(tmp_path.parent.glob("charts-redis*/data/users.acl")).read_text(encoding="utf-8")
    assert PASSWORD not in acl and "#" in acl
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(charts_redis, password="not-the-password").ping()


def test_the_store_works_through_the_charts_acl(charts_redis: str, tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n", encoding="utf-8")
    settings = OnlineStoreSettings(url=charts_redis, password_file=password_file, timeout_ms=1000.0)
    store = open_online_store(charts_redis, settings)
    assert store is not None
    t = 1_800_000_000_000
    events = [v.RefundEvent(f"e{i}", t + i * 1000, f"acct-{i % 3}", 4_999, "203.0.113.7", "dev-1") for i in range(12)]
    result = store.write(events)
    assert (result.applied, result.duplicates) == (12, 0)
    assert store.write(events[:3]).duplicates == 3  # replays change nothing
    query = v.RefundEvent("q", t + 20_000, "acct-new", 1_000, "203.0.113.7", "dev-1")
    readings = store.read([query], 1.0)
    assert readings.watermark_ms == t + 11_000
    (velocity,) = [v.resolve(query, reading) for reading in readings.readings]
    assert velocity.known and velocity.ip_accounts_1h == 4  # the 3 accounts seen on the IP, the requester included
    store.close()


@pytest.mark.parametrize(
    "command",
    [
        ("FLUSHALL",),
        ("CONFIG", "SET", "maxmemory", "1"),
        ("KEYS", "*"),
        ("SET", "other:key", "1"),
        ("ACL", "SETUSER", "x", "on"),
    ],
)
def test_the_model_servers_user_cannot_do_more(charts_redis: str, command: tuple[str, ...]) -> None:
    client = redis.Redis.from_url(charts_redis, password=PASSWORD)
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.execute_command(*command)  # type: ignore[no-untyped-call]
    client.close()
