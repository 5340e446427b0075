#!/usr/bin/env bash
# Build the krew archive of the kubectl plugin (kubectl-modelrollout) and write its sha256, version and URL into
# deploy/krew/modelrollout.yaml, the manifest `kubectl krew install --manifest=… --archive=…` (or the krew index)
# takes. The archive holds the controller's locked dependencies (locks/controller.txt, hashes checked, CPython 3.11
# manylinux x86_64 wheels only) and this project in lib/, and a launcher that runs them with the host's python3.11.
#
# usage: scripts/krew-package.sh [RELEASE_URL_BASE]    (archive in dist/; the base defaults to the project's
#                                                      GitHub releases, the archive's name is appended)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-.venv/bin/python}
version=v$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
base=${1:-https://github.com/fraudwatch/fraudwatch/releases/download/$version}
name=kubectl-modelrollout-$version-linux-amd64
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
dir=$stage/$name
platforms=()
for tag in manylinux_2_36 manylinux_2_28 manylinux_2_17 manylinux2014 linux; do platforms+=(--platform "${tag}_x86_64"); done
"$python" -m pip install --quiet --no-compile --disable-pip-version-check --no-warn-conflicts --target "$dir/lib" \
  --require-hashes \
  --only-binary=:all: "${platforms[@]}" --python-version 3.11 --implementation cp -r locks/controller.txt
# this project's packages as they are in the tree (the wheel would carry the same files)
tar --exclude=__pycache__ -cf - rollout service | tar -xf - -C "$dir/lib"
rm -rf "$dir/lib/bin"
for entry in kubectl-modelrollout:console_kubectl_main kubectl_complete-modelrollout:console_kubectl_complete; do
  cat > "$dir/${entry%%:*}" <<LAUNCHER
#!/bin/sh
# krew links this file into its bin directory: find lib/ beside the real file.
here=\$(dirname "\$(readlink -f "\$0")")
PYTHONPATH="\$here/lib" exec "\${FW_PYTHON:-python3.11}" -c 'from rollout.cli.main import ${entry#*:}; ${entry#*:}()' "\$@"
LAUNCHER
  chmod 0755 "$dir/${entry%%:*}"
done
mkdir -p dist
archive=dist/$name.tar.gz
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - -C "$stage" "$name" | gzip -n -9 > "$archive"
sha=$(sha256sum "$archive" | cut -d' ' -f1)
"$python" - "$version" "$base/$name.tar.gz" "$sha" "$name" <<'PY'
import sys
from pathlib import Path

import yaml

version, uri, sha, name = sys.argv[1:]
path = Path("deploy/krew/modelrollout.yaml")
head = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
manifest = yaml.safe_load(path.read_text())
manifest["spec"]["version"] = version
for platform in manifest["spec"]["platforms"]:
    platform |= {"uri": uri, "sha256": sha}
    for op in platform["files"]:
        op["from"] = f"{name}/{op['from'].split('/', 1)[1]}"


def literal(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


yaml.SafeDumper.add_representer(str, literal)
path.write_text(head + yaml.safe_dump(manifest, sort_keys=False, width=120, indent=2))
PY
echo "$archive sha256 $sha -> deploy/krew/modelrollout.yaml"
