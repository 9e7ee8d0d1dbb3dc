#!/usr/bin/env bash
# Build a real Kubernetes control plane for `make deploy-check` (deploy/tools/deploy_check.py):
# kube-apiserver, kube-scheduler, kube-controller-manager and kubectl, from the Go module
# k8s.io/kubernetes@$K8S_VERSION (versions.env) on the Go module proxy. That module's go.mod
# replaces its 31 staging modules (k8s.io/api, k8s.io/client-go, ...) with ./staging folders
# that its module zip does not hold, so a throwaway module requires it and replaces each of
# them with the published v0.<minor>.<patch>.
# The binaries land in ${ONPOLICY_TOOLS_DIR:-~/.cache/onpolicy/tools}/k8s-$K8S_VERSION/bin,
# built once (about 5 minutes on 2 cores); a second run with them there does nothing.
# Prints that bin folder.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
tools="${ONPOLICY_TOOLS_DIR:-$HOME/.cache/onpolicy/tools}"
dest="$tools/k8s-$K8S_VERSION"
bins=(kube-apiserver kube-scheduler kube-controller-manager kubectl)

say() { echo "deploy/tools: $*" >&2; }
die() { say "error: $*"; exit 1; }

if [[ -f "$dest/.complete" ]]; then
  echo "$dest/bin"
  exit 0
fi
command -v go >/dev/null || die "go is needed to build Kubernetes $K8S_VERSION from the Go module proxy"

say "building kube-apiserver, kube-scheduler, kube-controller-manager, kubectl $K8S_VERSION (about 5 minutes, once)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
kdir="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
[[ -f "$kdir/go.mod" ]] || die "go mod download k8s.io/kubernetes@$K8S_VERSION gave no go.mod"
staging_version="v0.${K8S_VERSION#v1.}"
mapfile -t staging < <(sed -n 's|^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*|\1|p' "$kdir/go.mod")
((${#staging[@]} > 20)) || die "found only ${#staging[@]} staging modules in $kdir/go.mod"
go_line="$(grep -m1 '^go ' "$kdir/go.mod")"
godebug_line="$(grep -m1 '^godebug ' "$kdir/go.mod" || true)"
{
  echo "module onpolicy.deploy/k8s"
  echo
  echo "$go_line"
  [[ -n "$godebug_line" ]] && echo "$godebug_line"
  echo
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo
  echo "replace ("
  for m in "${staging[@]}"; do echo "	$m => $m $staging_version"; done
  echo ")"
} >"$work/go.mod"
{
  echo "//go:build tools"
  echo
  echo "package tools"
  echo
  echo "import ("
  for b in "${bins[@]}"; do echo "	_ \"k8s.io/kubernetes/cmd/$b\""; done
  echo ")"
} >"$work/tools.go"

minor="${K8S_VERSION#v1.}"
minor="${minor%%.*}"
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
(
  cd "$work"
  export GOFLAGS=-mod=mod GOWORK=off CGO_ENABLED=0
  go mod tidy >&2
  mkdir -p out
  start=$SECONDS
  for b in "${bins[@]}"; do
    go build -trimpath -ldflags "$ldflags" -o "out/$b" "k8s.io/kubernetes/cmd/$b" >&2
    say "  $b built ($((SECONDS - start)) s so far)"
  done
)
rm -rf "$dest.tmp" && mkdir -p "$dest.tmp/bin"
for b in "${bins[@]}"; do mv "$work/out/$b" "$dest.tmp/bin/"; done
cp "$work/go.mod" "$work/go.sum" "$dest.tmp/"
# How long this build took (module downloads included), for deploy_check.json.
echo "$SECONDS" >"$dest.tmp/build_seconds"
touch "$dest.tmp/.complete"
rm -rf "$dest" && mv "$dest.tmp" "$dest"
echo "$dest/bin"
