#!/usr/bin/env bash
# Builds, once, the binaries of fraudwatch's end-to-end Kubernetes control plane from Go modules (no Docker, no
# release tarballs: only the Go toolchain and the Go module proxy):
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubelet     k8s.io/kubernetes, latest patch of 1.36
#   (+ kubectl)                                                          (kubelet: with Debian's containerd + runc)
#   etcd                                                                 go.etcd.io/etcd/server/v3, latest 3.6.x
#   helm                                                                 helm.sh/helm/v3, latest patch of 3.21
#   kwok (+ its stage definitions)                                       sigs.k8s.io/kwok v0.8.0
# Each one is cached by version outside the repository, in $FW_K8S_CACHE/<name>-<version>/ (default
# ~/.cache/fraudwatch/k8s); only what is missing is built. On success the script prints ONE line on stdout: a
# directory holding all the binaries (symlinks), the kwok stages and versions.json. Everything else goes to stderr.
#
# Usage: scripts/k8s-binaries.sh           resolve the latest patches on the module proxy, build what is missing
#        scripts/k8s-binaries.sh --check   no network, no build: print the newest complete cached set, or exit 3
#
# Environment (all optional):
#   FW_K8S_CACHE            cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/fraudwatch/k8s)
#   FW_K8S_SERIES           Kubernetes minor series (default 1.36); FW_K8S_VERSION pins a patch (e.g. v1.36.3)
#   FW_ETCD_SERIES          etcd series (default 3.6);              FW_ETCD_VERSION pins one (e.g. v3.6.16)
#   FW_HELM_SERIES          helm series (default 3.21);             FW_HELM_VERSION pins one (e.g. v3.21.4)
#   FW_KWOK_VERSION         kwok version (default v0.8.0)
#   FW_K8S_KUBECTL          1 (default) also builds kubectl; 0 skips it
#   FW_K8S_OFFLINE          1: resolve versions from the cache only (like --check, but still builds pinned ones)
#   FW_K8S_BUILD_JOBS       go build -p (default: number of CPUs); builds always run under `nice -n 19`
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
templates="$here/k8s"

CACHE="${FW_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fraudwatch/k8s}"
K8S_SERIES="${FW_K8S_SERIES:-1.36}"
ETCD_SERIES="${FW_ETCD_SERIES:-3.6}"
HELM_SERIES="${FW_HELM_SERIES:-3.21}"
KWOK_VERSION="${FW_KWOK_VERSION:-v0.8.0}"
WITH_KUBECTL="${FW_K8S_KUBECTL:-1}"
OFFLINE="${FW_K8S_OFFLINE:-0}"
JOBS="${FW_K8S_BUILD_JOBS:-$(nproc)}"
CHECK_ONLY=0

case "${1:-}" in
  --check) CHECK_ONLY=1; OFFLINE=1 ;;
  "") ;;
  -h | --help) sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
esac

log() { printf '[k8s-binaries] %s\n' "$*" >&2; }
die() { log "ERROR: $1"; exit "${2:-1}"; }

command -v go >/dev/null 2>&1 || die "the Go toolchain (go) is not on PATH"
export GOWORK=off GOFLAGS="${GOFLAGS:-} -p=$JOBS" CGO_ENABLED=0
GO=(nice -n 19 go)

k8s_binaries=(kube-apiserver kube-controller-manager kube-scheduler kubelet)
[ "$WITH_KUBECTL" = "1" ] && k8s_binaries+=(kubectl)

# --- version resolution ---------------------------------------------------------------------------------------
# The newest version of `module` matching v<series>.<patch> on the module proxy (stable releases only).
proxy_latest() {
  local module="$1" series="$2"
  go list -m -versions "$module" 2>/dev/null | tr ' ' '\n' | grep -E "^v${series//./\\.}\.[0-9]+$" | sort -V | tail -n1
}

# The newest complete cached build of `name` in `series` (a directory with a .complete stamp).
cached_latest() {
  local name="$1" series="$2" d
  for d in "$CACHE/$name-v$series".*/.complete; do
    [ -e "$d" ] && basename "$(dirname "$d")"
  done | sed "s/^$name-//" | grep -E "^v${series//./\\.}\.[0-9]+$" | sort -V | tail -n1 || true
}

# resolve <name> <module> <series> <pinned>: the pinned version, else the proxy's latest, else the cache's latest.
resolve() {
  local name="$1" module="$2" series="$3" pinned="$4" v=""
  if [ -n "$pinned" ]; then echo "$pinned"; return; fi
  if [ "$OFFLINE" != "1" ]; then
    v="$(proxy_latest "$module" "$series")"
    [ -n "$v" ] || log "could not list $module on the module proxy; using the newest cached $name $series"
  fi
  [ -n "$v" ] || v="$(cached_latest "$name" "$series")"
  [ -n "$v" ] || die "no complete $name $series build in $CACHE - run scripts/k8s-binaries.sh (needs the module proxy)" 3
  echo "$v"
}

mkdir -p "$CACHE"
cd "$CACHE"  # outside any module, so `go list -m` and `go mod download` see the proxy only
if [ "$CHECK_ONLY" != "1" ]; then
  exec 9>"$CACHE/.lock"
  flock 9  # one build at a time per cache (parallel runs wait here)
fi

K8S_VERSION="$(resolve kubernetes k8s.io/kubernetes "$K8S_SERIES" "${FW_K8S_VERSION:-}")"
ETCD_VERSION="$(resolve etcd go.etcd.io/etcd/server/v3 "$ETCD_SERIES" "${FW_ETCD_VERSION:-}")"
HELM_VERSION="$(resolve helm helm.sh/helm/v3 "$HELM_SERIES" "${FW_HELM_VERSION:-}")"

# --- helpers --------------------------------------------------------------------------------------------------
# missing <dir> <binary>...: the binaries not yet built in dir.
missing() {
  local dir="$1" b
  shift
  for b in "$@"; do [ -x "$dir/$b" ] || echo "$b"; done
}

# The `go` and `godebug` directives (single lines or blocks) of a go.mod file.
go_directives() {
  awk '/^go [0-9]/ {print} /^godebug \(/ {b=1} b {print} b && /^\)/ {b=0} /^godebug [^(]/ {print}' "$1"
}

# render <template> KEY=value...: the template with every @KEY@ replaced (values may span lines).
render() {
  local text kv
  text="$(<"$1")"
  shift
  for kv in "$@"; do text="${text//@${kv%%=*}@/${kv#*=}}"; done
  printf '%s\n' "$text"
}

# CPU seconds (user + system) of this script's finished children, grandchildren included (/proc/<pid>/stat).
children_cpu() {
  awk -v tck="$(getconf CLK_TCK)" '{ printf "%.0f", ($16 + $17) / tck }' "/proc/$$/stat"
}

# A JSON file `<dir>/build.json`: version, wall and CPU seconds of the build, binary sizes (docs/kubernetes-testing.md).
# An incremental build (only the missing binaries of a directory) adds its times to the recorded ones.
record_build() {
  local dir="$1" version="$2" seconds="$3" cpu=$(($(children_cpu) - $4)) b sizes="" total_s total_cpu prev_s prev_cpu
  shift 4
  for b in "$@"; do sizes+="${sizes:+, }\"$b\": $(stat -c %s "$dir/$b")"; done
  total_s=$seconds total_cpu=$cpu
  if [ -f "$dir/build.json" ]; then
    prev_s="$(sed -n 's/.*"build_seconds": \([0-9]*\).*/\1/p' "$dir/build.json")"
    prev_cpu="$(sed -n 's/.*"cpu_seconds": \([0-9]*\).*/\1/p' "$dir/build.json")"
    total_s=$((seconds + ${prev_s:-0})) total_cpu=$((cpu + ${prev_cpu:-0}))
  fi
  printf '{"version": "%s", "build_seconds": %s, "cpu_seconds": %s, "jobs": %s, "go": "%s", "bytes": {%s}}\n' \
    "$version" "$total_s" "$total_cpu" "$JOBS" "$(go env GOVERSION)" "$sizes" >"$dir/build.json"
  log "built $(basename "$dir") in ${seconds}s (${cpu} CPU seconds)"
}

# need_build <dir> <binary>...: 0 if something must be built (and we may), dies in --check mode.
need_build() {
  local dir="$1"
  shift
  [ -f "$dir/.complete" ] && [ -z "$(missing "$dir" "$@")" ] && return 1
  [ "$CHECK_ONLY" = "1" ] && die "not built: $dir ($(missing "$dir" "$@" | tr '\n' ' '))- run scripts/k8s-binaries.sh" 3
  return 0
}

# --- helm -------------------------------------------------------------------------------------------------------
build_helm() {
  local dir="$CACHE/helm-$HELM_VERSION" start cpu gomod k8s_minor
  need_build "$dir" helm || return 0
  log "building helm $HELM_VERSION (go install)"
  start=$SECONDS cpu=$(children_cpu)
  mkdir -p "$dir"
  gomod="$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')"
  # helm's Makefile stamps the Kubernetes version it defaults to (its client-go minor + 1.<minor>).
  k8s_minor="$(awk '$1 == "k8s.io/client-go" {split($2, v, "."); print v[2]}' "$gomod")"
  GOBIN="$dir" "${GO[@]}" install -trimpath -ldflags "-s -w \
    -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
    -X helm.sh/helm/v3/internal/version.gitTreeState=clean \
    -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$k8s_minor \
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$k8s_minor" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  record_build "$dir" "$HELM_VERSION" $((SECONDS - start)) "$cpu" helm
  touch "$dir/.complete"
}

# --- kwok -------------------------------------------------------------------------------------------------------
build_kwok() {
  local dir="$CACHE/kwok-$KWOK_VERSION" start cpu src
  need_build "$dir" kwok || return 0
  log "building kwok $KWOK_VERSION (go install)"
  start=$SECONDS cpu=$(children_cpu)
  mkdir -p "$dir/stages"
  GOBIN="$dir" "${GO[@]}" install -trimpath -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  # kwok refuses to run without Stage definitions; keep the ones shipped in its module beside the binary.
  src="$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
  install -m 0644 "$src/kustomize/stage/node/fast/node-initialize.yaml" "$src/kustomize/stage/node/heartbeat/node-heartbeat.yaml" \
    "$src/kustomize/stage/pod/fast/pod-ready.yaml" "$src/kustomize/stage/pod/fast/pod-complete.yaml" \
    "$src/kustomize/stage/pod/fast/pod-delete.yaml" "$dir/stages/"
  record_build "$dir" "$KWOK_VERSION" $((SECONDS - start)) "$cpu" kwok
  touch "$dir/.complete"
}

# --- etcd -------------------------------------------------------------------------------------------------------
build_etcd() {
  local dir="$CACHE/etcd-$ETCD_VERSION" start cpu gomod
  need_build "$dir" etcd || return 0
  log "building etcd $ETCD_VERSION (wrapper module)"
  start=$SECONDS cpu=$(children_cpu)
  mkdir -p "$dir/src"
  gomod="$(go mod download -json "go.etcd.io/etcd/server/v3@$ETCD_VERSION" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')"
  render "$templates/etcd.go.mod.tmpl" "ETCD_VERSION=$ETCD_VERSION" "GO_DIRECTIVES=$(go_directives "$gomod")" \
    >"$dir/src/go.mod"
  (cd "$dir/src" && "${GO[@]}" mod tidy && "${GO[@]}" build -trimpath -ldflags "-s -w" -o "$dir/etcd.tmp" \
    go.etcd.io/etcd/server/v3)
  mv "$dir/etcd.tmp" "$dir/etcd"
  record_build "$dir" "$ETCD_VERSION" $((SECONDS - start)) "$cpu" etcd
  touch "$dir/.complete"
}

# --- kube-apiserver, kube-controller-manager, kube-scheduler, kubectl -----------------------------------------------
build_kubernetes() {
  local dir="$CACHE/kubernetes-$K8S_VERSION" start cpu gomod staging replaces="" tools="" m b todo ldflags=""
  local minor="${K8S_VERSION#v1.}"
  minor="${minor%%.*}"
  need_build "$dir" "${k8s_binaries[@]}" || return 0
  mapfile -t todo < <(missing "$dir" "${k8s_binaries[@]}")
  log "building ${todo[*]} $K8S_VERSION (wrapper module; the first build takes many minutes)"
  start=$SECONDS cpu=$(children_cpu)
  mkdir -p "$dir/src" "$dir/tmp"
  gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')"
  # The staging modules: what upstream requires at v0.0.0 and replaces with ./staging/src/...
  staging="$(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$gomod" | sort -u)"
  [ -n "$staging" ] || die "found no staging modules in $gomod"
  for m in $staging; do replaces+="	$m => $m v0.${K8S_VERSION#v1.}"$'\n'; done
  for b in "${k8s_binaries[@]}"; do tools+="	k8s.io/kubernetes/cmd/$b"$'\n'; done
  render "$templates/kubernetes.go.mod.tmpl" "K8S_VERSION=$K8S_VERSION" "GO_DIRECTIVES=$(go_directives "$gomod")" \
    "REPLACES=${replaces%$'\n'}" "TOOLS=${tools%$'\n'}" >"$dir/src/go.mod"
  # Version stamps, as upstream's hack/lib/version.sh sets them (else the server reports v0.0.0-master).
  for m in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X $m.gitVersion=$K8S_VERSION -X $m.gitMajor=1 -X $m.gitMinor=$minor -X $m.gitTreeState=clean"
    ldflags+=" -X $m.buildDate=$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "${gomod%.mod}.info")"
  done
  (cd "$dir/src" && "${GO[@]}" mod tidy &&
    "${GO[@]}" build -trimpath -tags selinux,notest,grpcnotrace -ldflags "-s -w$ldflags" -o "$dir/tmp/" \
      "${todo[@]/#/k8s.io/kubernetes/cmd/}")
  for b in "${todo[@]}"; do mv "$dir/tmp/$b" "$dir/$b"; done
  rmdir "$dir/tmp"
  record_build "$dir" "$K8S_VERSION" $((SECONDS - start)) "$cpu" "${k8s_binaries[@]}"
  touch "$dir/.complete"
}

build_helm
build_kwok
build_etcd
build_kubernetes

# --- the set: one directory with everything, keyed by the versions -------------------------------------------------
set_dir="$CACHE/sets/kubernetes-${K8S_VERSION}_etcd-${ETCD_VERSION}_helm-${HELM_VERSION}_kwok-${KWOK_VERSION}"
mkdir -p "$set_dir"
for b in "${k8s_binaries[@]}"; do ln -sfn "$CACHE/kubernetes-$K8S_VERSION/$b" "$set_dir/$b"; done
ln -sfn "$CACHE/etcd-$ETCD_VERSION/etcd" "$set_dir/etcd"
ln -sfn "$CACHE/helm-$HELM_VERSION/helm" "$set_dir/helm"
ln -sfn "$CACHE/kwok-$KWOK_VERSION/kwok" "$set_dir/kwok"
ln -sfn "$CACHE/kwok-$KWOK_VERSION/stages" "$set_dir/kwok-stages"
printf '{"kubernetes": "%s", "etcd": "%s", "helm": "%s", "kwok": "%s"}\n' \
  "$K8S_VERSION" "$ETCD_VERSION" "$HELM_VERSION" "$KWOK_VERSION" >"$set_dir/versions.json.tmp"
mv "$set_dir/versions.json.tmp" "$set_dir/versions.json"
log "ready: kubernetes $K8S_VERSION, etcd $ETCD_VERSION, helm $HELM_VERSION, kwok $KWOK_VERSION"
echo "$set_dir"
