"""Each image's entry modules import with only what its lock installs, under the chart's security context.

tests/unit/test_import_budget.py bounds what the entry modules load in the development environment, where optional
imports succeed because everything is installed; here each module is imported inside its own image (scripts/images.sh,
dependencies from locks/<component>.txt only), read-only, as the chart's non-root user, with no capabilities — so an
import only the development environment satisfies fails here, and the router and controller images are shown to
hold no model stack at all (not merely not to load it).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.podkit import RLIMITS, RUNTIME, images

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL_STACK = ("xgboost", "sklearn", "scipy", "pandas", "mlflow", "matplotlib", "bentoml")
#: component → (user, entry modules, top-level modules its image must not even contain)
IMAGES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "serve": ("1034:1034", ("service.serving.bento", "service.artifacts.registry"),
              ("sklearn", "pandas", "matplotlib", "kubernetes")),
    "router": ("10001:10001", ("rollout.router.app", "rollout.backends.kube.api", "kubernetes", "psycopg"),
               MODEL_STACK),
    "controller": ("10001:10001", ("rollout.controller.loop", "rollout.controller.kube", "rollout.cli.main",
                                   "kubernetes"), MODEL_STACK),
    "retraining": ("10001:10001", ("service.cli.main", "service.retraining.job", "service.retraining.webhook",
                                   "service.retraining.handoff", "rollout.backends.registry",
                                   "rollout.controller.loop"), ()),
}  # fmt: skip

_PROBE = """
import importlib, importlib.util, json, sys
for module in sys.argv[2:]:
    importlib.import_module(module)
absent = json.loads(sys.argv[1])
print(json.dumps({"present": [m for m in absent if importlib.util.find_spec(m) is not None]}))
"""


@pytest.fixture(scope="module")
def built() -> dict[str, str]:
    return images(*IMAGES)


@pytest.mark.parametrize("component", sorted(IMAGES))
def test_the_images_entry_modules_import_from_its_lock_alone(component: str, built: dict[str, str]) -> None:
    user, modules, absent = IMAGES[component]
    argv = ["podman", *RUNTIME, "run", "--rm", *RLIMITS, "--user", user, "--read-only", "--read-only-tmpfs=false",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--tmpfs", "/tmp:rw,mode=1777",
            "--tmpfs", "/var/lib/fraudwatch:rw,mode=1777", "--network", "none",
            # the model server's code is the Bento's src/, which `bentoml serve` puts on the path
            *(["--env", "PYTHONPATH=/home/bentoml/bento/src"] if component == "serve" else []), built[component],
            "python", "-c", _PROBE, json.dumps(absent), *modules]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"present": []}
