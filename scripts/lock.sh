#!/usr/bin/env bash
# The lock files of the images (locks/<component>.txt): every distribution each component installs, pinned, with
# the sha256 of each of its files on PyPI, resolved from pyproject.toml's extra of that component for the images'
# interpreter (Debian bookworm's CPython 3.11 on x86_64, glibc 2.36). The images install them with
# `pip install --require-hashes --no-deps` (scripts/images.sh); `make test` audits them (scripts/audit.sh) and
# tests/unit/test_locks.py checks they agree with pyproject.toml.
#
#   component   extra                 image
#   serve       [serve]               fraudwatch/refund-fraud-model (the Bento: bentoml serve)
#   router      [router]              fraudwatch/router
#   controller  [controller]          fraudwatch/controller
#   retraining  [train,controller]    fraudwatch/retraining (CronJob, webhook; the registry-backed controller)
#
# nvidia-nccl-cu12 (xgboost's multi-GPU collective library, 470 MB) is left out of every lock: the images are
# CPU-only and xgboost loads it only for distributed GPU training.
#
# Usage: scripts/lock.sh              re-resolve every lock (newest releases within pyproject's ranges)
#        scripts/lock.sh --check      re-resolve into a temporary directory, keeping the pins of the current locks
#                                     where they still satisfy pyproject.toml; exit 1 when a lock would change
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
UV="${UV:-$root/.venv/bin/uv}"
PLATFORM="x86_64-manylinux_2_36"
PYTHON_VERSION="3.11"

declare -A EXTRAS=([serve]="serve" [router]="router" [controller]="controller" [retraining]="train controller")

compile() {  # compile <component> <output>
  local component="$1" out="$2" extra args=()
  for extra in ${EXTRAS[$component]}; do args+=(--extra "$extra"); done
  "$UV" pip compile pyproject.toml "${args[@]}" --generate-hashes --python-version "$PYTHON_VERSION" \
    --python-platform "$PLATFORM" --no-emit-package nvidia-nccl-cu12 --custom-compile-command "scripts/lock.sh" \
    --quiet --output-file "$out" ${UV_EXTRA:-}
}

case "${1:-}" in
  "")
    for component in "${!EXTRAS[@]}"; do compile "$component" "locks/$component.txt"; done
    ls -l locks/ >&2 ;;
  --check)
    tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
    status=0
    for component in "${!EXTRAS[@]}"; do
      cp "locks/$component.txt" "$tmp/$component.txt"   # uv keeps the pins of an existing output file
      compile "$component" "$tmp/$component.txt"
      if ! diff -u "locks/$component.txt" "$tmp/$component.txt" >&2; then
        echo "locks/$component.txt is out of date with pyproject.toml: run scripts/lock.sh" >&2; status=1
      fi
    done
    exit "$status" ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac
