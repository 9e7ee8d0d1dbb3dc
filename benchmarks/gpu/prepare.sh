#!/usr/bin/env bash
# Builds .dev/ (git-ignored): what `benchmarks/gpu/run_trainer.sh` needs on a GPU machine that
# has PyTorch but no network: a trimmed Java runtime and Kafka's jars (for a real broker), the
# Python wheels its image lacks (Python 3.12), and the model's config and tokenizer.
# Everything must stay under the 64 MiB a device call carries. Run from the repo root after
# `make prepare`; then carry .dev and run `bash .dev/run.sh` there.
set -euo pipefail
HOME_DIR=${ONPOLICY_HOME:-$HOME/.cache/onpolicy}
rm -rf .dev /tmp/onpolicy-jre /tmp/onpolicy-kafka && mkdir -p .dev/whl .dev/model
# java.desktop is needed for java.beans (Kafka's config classes); no AWT natives are.
jlink --add-modules java.base,java.desktop,java.logging,java.management,java.naming,\
java.security.jgss,java.security.sasl,java.sql,java.xml,jdk.crypto.ec,jdk.management,\
jdk.unsupported,jdk.zipfs,java.instrument,java.scripting,java.net.http,jdk.naming.dns \
  --strip-debug --no-man-pages --no-header-files --compress=0 --output /tmp/onpolicy-jre/jre
rm -f /tmp/onpolicy-jre/jre/lib/{libawt_xawt,libsplashscreen,libfontmanager,libjsound}.so
tar -C /tmp/onpolicy-jre -cf - jre | xz -T0 -6 > .dev/jre.tar.xz
# Kafka's jars, with the compression codecs' natives for other platforms dropped.
mkdir -p /tmp/onpolicy-kafka/libs && cp "$HOME_DIR"/kafka-*/libs/*.jar /tmp/onpolicy-kafka/libs/
for jar in /tmp/onpolicy-kafka/libs/{zstd-jni,snappy-java,lz4-java}-*.jar; do
  drop=$(unzip -Z1 "$jar" | grep -E '\.(so|dll|dylib|jnilib|a)$' | grep -v -E 'linux/amd64|Linux/x86_64|linux/x86_64' || true)
  [ -z "$drop" ] || zip -q -d "$jar" $drop
done
tar -C /tmp/onpolicy-kafka -cf - . | xz -T0 -9 > .dev/kafka.tar.xz
model=$(ls -d "$HOME_DIR"/models/*/ | head -1)
cp "$model"/*.json "$model"/*.jinja .dev/model/ && xz -9 .dev/model/tokenizer.json
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform any -d .dev/whl \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 kafka-python==3.0.12 \
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv \
  annotated-types typing-inspection fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 \
  python-json-logger zstandard protobuf==7.36.2 peft==0.21.2 opentelemetry-api
cp benchmarks/gpu/run_trainer.sh .dev/run.sh
du -sh .dev
