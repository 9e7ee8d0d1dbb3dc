#!/usr/bin/env bash
# Fetch the pinned tools and schemas that validate deploy/ offline (see versions.env):
#   kustomize                 go install from the Go module proxy
#   KEDA and prometheus-operator CRDs, compose-spec.json
#                             from those projects' Go modules (go mod download)
#   Strimzi CRDs              generated from the io.strimzi:api jar (Maven Central) with
#                             Strimzi's own crd-generator, as Strimzi's build does; needs Java 21+
# Everything lands in ${ONPOLICY_TOOLS_DIR:-~/.cache/onpolicy/tools}, one folder per pinned
# version; a second run with everything cached does nothing and takes well under a second.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
tools="${ONPOLICY_TOOLS_DIR:-$HOME/.cache/onpolicy/tools}"
schemas="$tools/schemas"
mkdir -p "$tools/bin" "$schemas"

say() { echo "deploy/tools: $*" >&2; }
die() { say "error: $*"; exit 1; }
need() { command -v "$1" >/dev/null || die "$1 is needed ($2)"; }

# --- kustomize --------------------------------------------------------------------------
kustomize="$tools/bin/kustomize-$KUSTOMIZE_VERSION"
if [[ ! -x "$kustomize" ]]; then
  need go "to build kustomize from the Go module proxy"
  say "building kustomize $KUSTOMIZE_VERSION (about a minute)"
  gobin="$(mktemp -d)"
  GOBIN="$gobin" GOFLAGS=-mod=mod go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
  mv "$gobin/kustomize" "$kustomize"
  rmdir "$gobin"
fi

# --- files from Go modules --------------------------------------------------------------
# module_dir MODULE@VERSION: the module's extracted source in the module cache.
module_dir() {
  need go "to download $1 from the Go module proxy"
  go mod download -json "$1" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'
}
# copy_from_module MODULE@VERSION DEST FILE...: copy FILEs (paths in the module) into DEST.
copy_from_module() {
  local mod="$1" dest="$2"
  shift 2
  [[ -f "$dest/.complete" ]] && return 0
  say "fetching $mod"
  local dir
  dir="$(module_dir "$mod")"
  [[ -n "$dir" ]] || die "go mod download $mod gave no folder"
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  for f in "$@"; do cp "$dir/$f" "$dest.tmp/"; done
  chmod -R u+w "$dest.tmp"
  touch "$dest.tmp/.complete"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
}

copy_from_module "github.com/kedacore/keda/v2@$KEDA_VERSION" "$schemas/keda-$KEDA_VERSION" \
  config/crd/bases/keda.sh_scaledobjects.yaml \
  config/crd/bases/keda.sh_triggerauthentications.yaml
copy_from_module "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
  "$schemas/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION" \
  example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml \
  example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml
copy_from_module "github.com/compose-spec/compose-go/v2@$COMPOSE_GO_VERSION" \
  "$schemas/compose-spec-$COMPOSE_GO_VERSION" schema/compose-spec.json

# --- Strimzi CRDs -----------------------------------------------------------------------
# java_21: a Java 21+ binary (Strimzi 1.x is built for 21), from JAVA_HOME, PATH or /usr/lib/jvm.
java_21() {
  local candidates=()
  [[ -n "${JAVA_HOME:-}" ]] && candidates+=("$JAVA_HOME/bin/java")
  command -v java >/dev/null && candidates+=("$(command -v java)")
  candidates+=(/usr/lib/jvm/*/bin/java)
  for j in "${candidates[@]}"; do
    [[ -x "$j" ]] || continue
    local v
    v="$("$j" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')"
    if [[ "${v%%.*}" =~ ^[0-9]+$ ]] && ((${v%%.*} >= 21)); then
      echo "$j"
      return 0
    fi
  done
  return 1
}

strimzi="$schemas/strimzi-$STRIMZI_VERSION"
if [[ ! -f "$strimzi/.complete" ]]; then
  need mvn "to fetch Strimzi's api and crd-generator jars from Maven Central"
  java="$(java_21)" || die "Strimzi $STRIMZI_VERSION's crd-generator needs Java 21 or newer"
  say "generating Strimzi $STRIMZI_VERSION CRDs with $java"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  cat >"$work/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>onpolicy.deploy</groupId><artifactId>strimzi-crds</artifactId><version>0</version>
  <dependencies>
    <dependency><groupId>io.strimzi</groupId><artifactId>api</artifactId>
      <version>$STRIMZI_VERSION</version></dependency>
    <dependency><groupId>io.strimzi</groupId><artifactId>crd-generator</artifactId>
      <version>$STRIMZI_VERSION</version></dependency>
  </dependencies>
</project>
POM
  (cd "$work" && mvn -q -B dependency:copy-dependencies -DoutputDirectory=libs) >&2
  mkdir -p "$work/crds"
  model=io.strimzi.api.kafka.model
  "$java" -cp "$work/libs/*" io.strimzi.crdgenerator.CrdGenerator \
    --crd-api-version v1 --api-versions v1 --storage-version v1 --yaml \
    "$model.kafka.Kafka=$work/crds/kafka.strimzi.io_kafkas.yaml" \
    "$model.nodepool.KafkaNodePool=$work/crds/kafka.strimzi.io_kafkanodepools.yaml" \
    "$model.topic.KafkaTopic=$work/crds/kafka.strimzi.io_kafkatopics.yaml" \
    "$model.user.KafkaUser=$work/crds/kafka.strimzi.io_kafkausers.yaml" >&2
  touch "$work/crds/.complete"
  rm -rf "$strimzi" && mv "$work/crds" "$strimzi"
fi

echo "$tools"
