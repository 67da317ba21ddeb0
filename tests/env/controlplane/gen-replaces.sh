#!/usr/bin/env bash
# Regenerate the staging-module `replace` block for a given k8s.io/kubernetes tag.
# k/k's go.mod requires each staging module at v0.0.0 and points it at ./staging/src
# via local replaces, which are ignored in a consumer module; a consumer must replace
# each with the published v0.<minor>.<patch> tag instead.
#
#   ./gen-replaces.sh v1.34.4 > /tmp/replaces.txt   # then paste into go.mod
set -euo pipefail
tag="${1:?usage: $0 v1.MINOR.PATCH}"
staging="v0.${tag#v1.}"
go mod download -json "k8s.io/kubernetes@${tag}" >/dev/null
modfile="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/${tag}.mod"
echo "replace ("
sed -n '/^replace (/,/^)/p' "$modfile" \
  | awk -v v="$staging" '$2 == "=>" && $3 ~ /^\.\/staging\/src\// { printf "\t%s => %s %s\n", $1, $1, v }'
echo ")"
echo "// godebug line(s) upstream uses:"
grep -E '^godebug' "$modfile" | sed 's|^|// |'
