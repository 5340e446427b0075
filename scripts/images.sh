#!/usr/bin/env bash
# Builds, once, the OCI images of every component the Helm chart deploys, without Docker and without a container
# registry: a Debian base made with debootstrap from the Debian mirror apt uses, then buildah. Dependencies come from
# the component's lock (locks/<component>.txt: pinned, hashed; `pip install --require-hashes --no-deps --no-index`
# from wheels downloaded with the same hashes), then the project. Each image is cached by content hash in podman's
# image store (tag = the hash) with a record in $FW_IMAGES_CACHE (default ~/.cache/fraudwatch/images): a change to
# the lock rebuilds that image's dependency layer, a change to the sources only its last layer.
#
#   component   image                               user         runs (the chart's command, or the image's own)
#   serve       localhost/fraudwatch/refund-fraud-model  1034:1034  bentoml serve /home/bentoml/bento (the built Bento)
#   router      localhost/fraudwatch/router         10001:10001  python -m rollout.router
#   controller  localhost/fraudwatch/controller     10001:10001  python -m rollout.controller
#   retraining  localhost/fraudwatch/retraining     10001:10001  fraudwatch retrain --trigger scheduled
#
# Every image runs with a read-only root filesystem: the only writable paths are the chart's emptyDirs, /tmp and
# /var/lib/fraudwatch (FW_HOME, FW_ROLLOUT_HOME; the model server's BENTOML_HOME is /var/lib/fraudwatch/bentoml).
# Python byte-code is compiled at build time (PYTHONDONTWRITEBYTECODE at run time); pip is removed.
#
# Usage: scripts/images.sh [component...]   (default: all four; `pause`: a pod sandbox image for a kubelet's
#                                             containerd) — prints "<component> <image>" per line on stdout,
#                                             everything else on stderr
# Environment: FW_IMAGES_CACHE (cache root), FW_DEBIAN_MIRROR (default: the first deb.debian.org-style URI of
#              /etc/apt/sources.list.d/*.sources, else http://deb.debian.org/debian)
set -euo pipefail
shopt -s inherit_errexit

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FW_IMAGES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fraudwatch/images}"
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
VENV=/opt/fraudwatch
DATA=/var/lib/fraudwatch
# Wheels the image's interpreter accepts: CPython 3.11 on x86_64 with glibc 2.36 (every manylinux tag up to it).
PY_PLATFORM=(--python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none --platform any
  --platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
for glibc in $(seq 5 36); do PY_PLATFORM+=(--platform "manylinux_2_${glibc}_x86_64"); done
HOST_PY="$root/.venv/bin/python"

log() { printf '[images] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
for tool in buildah podman debootstrap; do command -v "$tool" >/dev/null || die "$tool is missing: apt-get install -y podman buildah runc debootstrap"; done
[ -x "$HOST_PY" ] || die "no .venv: run scripts/bootstrap.sh test first"

mirror() {
  [ -n "${FW_DEBIAN_MIRROR:-}" ] && { echo "$FW_DEBIAN_MIRROR"; return; }
  local uri
  uri="$(sed -n 's/^URIs:[[:space:]]*\(http[^[:space:]]*\/debian\)[[:space:]]*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)"
  echo "${uri:-http://deb.debian.org/debian}"
}

key() { sha256sum | cut -c1-16; }  # the content hash of stdin
exists() { podman image exists "$1"; }

mkdir -p "$CACHE/wheels"
exec 9>"$CACHE/.lock"
flock 9  # one build at a time per cache

# --- the base: Debian bookworm minbase + python3, the two users of the chart ------------------------------------
base_image() {
  local bkey image rootfs tarball ctr mnt
  bkey="$(printf '%s %s %s v1' "$SUITE" "$PACKAGES" "$VENV" | key)"
  image="localhost/fraudwatch/base:$bkey"
  if ! exists "$image"; then
    tarball="$CACHE/base-$SUITE-$bkey.tar"
    if [ ! -f "$tarball" ]; then
      rootfs="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
      log "debootstrap $SUITE (minbase + $PACKAGES) from $(mirror) (about a minute)"
      debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$(mirror)" >"$CACHE/debootstrap.log" 2>&1 \
        || die "debootstrap failed: see $CACHE/debootstrap.log"
      rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
      tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
      rm -rf "$rootfs"
    fi
    ctr="$(buildah from scratch)"
    mnt="$(buildah mount "$ctr")"
    tar -C "$mnt" -xf "$tarball"
    # BentoML images run as `bentoml` (1034, the chart's modelServer.runAsUser); the other pods as 10001.
    printf 'bentoml:x:1034:1034::/home/bentoml:/usr/sbin/nologin\nfraudwatch:x:10001:10001::%s:/usr/sbin/nologin\n' \
      "$DATA" >>"$mnt/etc/passwd"
    printf 'bentoml:x:1034:\nfraudwatch:x:10001:\n' >>"$mnt/etc/group"
    mkdir -p "$mnt$DATA" "$mnt/home/bentoml"
    buildah umount "$ctr" >/dev/null
    buildah config --env LANG=C.UTF-8 --env PATH="$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
      --label org.opencontainers.image.base.name="debian:$SUITE (debootstrap minbase)" "$ctr"
    buildah commit --quiet --rm "$ctr" "$image" >/dev/null
    log "base image $image"
  fi
  echo "$image"
}

# --- the dependency layer: a venv with exactly the lock's distributions -----------------------------------------
deps_image() {
  local component="$1" base="$2" lock="$root/locks/$1.txt" dkey image ctr mnt
  dkey="$( (echo "$base"; cat "$lock") | key)"
  image="localhost/fraudwatch/$component-deps:$dkey"
  if ! exists "$image"; then
    log "$component: downloading the lock's wheels (hash-checked)"
    "$HOST_PY" -m pip download -q --require-hashes --no-deps --only-binary=:all: "${PY_PLATFORM[@]}" \
      -d "$CACHE/wheels" -r "$lock" >&2
    ctr="$(buildah from "$base")"
    mnt="$(buildah mount "$ctr")"
    cp "$lock" "$mnt/tmp/lock.txt"
    log "$component: installing $(grep -c '==' "$lock") locked distributions"
    buildah run --isolation chroot "$ctr" -- python3 -m venv "$VENV" >&2
    buildah run --isolation chroot -v "$CACHE/wheels:/tmp/wheels:ro" "$ctr" -- "$VENV/bin/python" -m pip install -q \
      --no-cache-dir --no-index --find-links /tmp/wheels --require-hashes --no-deps -r /tmp/lock.txt >&2
    rm -f "$mnt/tmp/lock.txt"
    buildah umount "$ctr" >/dev/null
    buildah commit --quiet --rm "$ctr" "$image" >/dev/null
    log "$component: dependency layer $image"
  fi
  echo "$image"
}

# --- the project: the wheel (or, for the model server, the built Bento), then the runtime configuration ---------
sources_key() {
  (tracked | (cd "$root" && xargs -0 sha256sum); sha256sum "$root/scripts/images.sh") | key
}

tracked() { (cd "$root" && git ls-files -z service rollout pyproject.toml README.md bentofile.yaml); }

project_wheel() {  # project_wheel <dir>: the fraudwatch wheel built from a copy of the tracked sources, in dir
  mkdir -p "$1/src"
  tracked | (cd "$root" && xargs -0 tar -cf -) | tar -C "$1/src" -xf -
  "$root/.venv/bin/uv" build --quiet --wheel --out-dir "$1" "$1/src" >&2
}

bento_dir() {  # bento_dir <dir>: `bentoml build` of bentofile.yaml (tracked sources), as a directory in dir/bento
  local home="$1/bentoml"
  mkdir -p "$1/src"
  tracked | (cd "$root" && xargs -0 tar -cf -) | tar -C "$1/src" -xf -
  cp -r "$root/locks" "$1/src/locks"
  (cd "$1/src" && BENTOML_HOME="$home" BENTOML_DO_NOT_TRACK=True "$root/.venv/bin/bentoml" build --output tag >&2)
  cp -r "$(find "$home/bentos" -mindepth 2 -maxdepth 2 -type d ! -name latest | head -n1)" "$1/bento"
}

configure() {  # configure <ctr> <component>
  local ctr="$1" common=(--env PYTHONDONTWRITEBYTECODE=1 --env PYTHONUNBUFFERED=1 --env "FW_HOME=$DATA"
    --label "org.opencontainers.image.source=fraudwatch" --label "io.fraudwatch.component=$2" --workingdir "$DATA")
  case "$2" in
    serve)
      buildah config "${common[@]}" --user 1034:1034 --env BENTOML_HOME="$DATA/bentoml" \
        --env BENTOML_DO_NOT_TRACK=True --port 3000 --entrypoint '[]' \
        --cmd '["bentoml", "serve", "/home/bentoml/bento", "--host", "0.0.0.0", "--port", "3000"]' "$ctr" ;;
    router)
      buildah config "${common[@]}" --user 10001:10001 --env "FW_ROLLOUT_HOME=$DATA" --port 8080 --port 8081 \
        --entrypoint '[]' --cmd '["python", "-m", "rollout.router"]' "$ctr" ;;
    controller)
      buildah config "${common[@]}" --user 10001:10001 --env "FW_ROLLOUT_HOME=$DATA" --port 9090 \
        --entrypoint '[]' --cmd '["python", "-m", "rollout.controller"]' "$ctr" ;;
    retraining)
      buildah config "${common[@]}" --user 10001:10001 --env "FW_ROLLOUT_HOME=$DATA" --port 8080 \
        --entrypoint '[]' --cmd '["fraudwatch", "retrain", "--trigger", "scheduled"]' "$ctr" ;;
  esac
}

name_of() { case "$1" in serve) echo refund-fraud-model ;; *) echo "$1" ;; esac; }

component_image() {
  local component="$1" deps="$2" ikey image ctr mnt work
  ikey="$( (echo "$deps"; sources_key; echo "$component") | key)"
  image="localhost/fraudwatch/$(name_of "$component"):$ikey"
  if ! exists "$image"; then
    work="$(mktemp -d)"
    ctr="$(buildah from "$deps")"
    mnt="$(buildah mount "$ctr")"
    if [ "$component" = serve ]; then
      bento_dir "$work"
      cp -r "$work/bento" "$mnt/home/bentoml/bento"
      chmod -R a+rX,go-w "$mnt/home/bentoml/bento"
      buildah run --isolation chroot "$ctr" -- "$VENV/bin/python" -m compileall -q /home/bentoml/bento/src >&2
    else
      project_wheel "$work"
      buildah run --isolation chroot -v "$work:/tmp/build:ro" "$ctr" -- sh -c \
        "$VENV/bin/python -m pip install -q --no-cache-dir --no-index --no-deps /tmp/build/*.whl" >&2
    fi
    # Nothing left to install with at run time.
    buildah run --isolation chroot "$ctr" -- "$VENV/bin/python" -m pip uninstall -q -y pip >&2
    rm -rf "$mnt/tmp/"* "$mnt/root/.cache"
    # The chart mounts emptyDirs (mode 0777) here; podman copies an image directory's mode onto its tmpfs.
    chmod 1777 "$mnt$DATA"
    buildah umount "$ctr" >/dev/null
    configure "$ctr" "$component"
    buildah commit --quiet --rm "$ctr" "$image" >/dev/null
    rm -rf "$work"
    printf '{"component": "%s", "image": "%s", "id": "%s", "built_at": "%s"}\n' "$component" "$image" \
      "$(podman image inspect --format '{{.Id}}' "$image")" "$(date -u +%FT%TZ)" >"$CACHE/$component-$ikey.json"
    log "$component: $image"
  fi
  echo "$image"
}

# --- the pod sandbox ("pause") image a kubelet's containerd needs (tests/e2e/test_kubelet_pods.py): the base, asleep --
pause_image() {
  local base="$1" image ctr
  image="localhost/fraudwatch/pause:$( (echo "$base"; echo "sleep infinity v1") | key)"
  if ! exists "$image"; then
    ctr="$(buildah from "$base")"
    buildah config --user 65535:65535 --entrypoint '[]' --cmd '["sleep", "infinity"]' "$ctr"
    buildah commit --quiet --rm "$ctr" "$image" >/dev/null
  fi
  echo "$image"
}

components=("$@")
[ ${#components[@]} -gt 0 ] || components=(serve router controller retraining)
base="$(base_image)"
for component in "${components[@]}"; do
  if [ "$component" = pause ]; then echo "pause $(pause_image "$base")"; continue; fi
  case "$component" in serve | router | controller | retraining) ;; *) die "unknown component: $component" ;; esac
  deps="$(deps_image "$component" "$base")"
  echo "$component $(component_image "$component" "$deps")"
done
