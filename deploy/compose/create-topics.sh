#!/bin/sh
# docker-compose's one-shot topic creation (the kafka-init service), with the same settings the
# services' own ensure_topics uses: policy, rounds and evals have one partition (updates, round
# plans and evaluations stay ordered) and, like the held-out prompts and the dead letters, are
# kept forever; records up to 8 MiB.
set -eu
bootstrap="${BOOTSTRAP:-kafka:9092}"
prefix="${TOPIC_PREFIX:-onpolicy.}"
partitions="${TOPIC_PARTITIONS:-3}"
retention_ms="${TOPIC_RETENTION_MS:-604800000}"
max_bytes=8388608
for kind in prompts completions scored pairs policy rounds heldout evals dlq; do
  parts="$partitions"
  retention="$retention_ms"
  case "$kind" in
    policy|rounds|evals) parts=1; retention=-1 ;;
    heldout|dlq) retention=-1 ;;
  esac
  /opt/kafka/bin/kafka-topics.sh --bootstrap-server "$bootstrap" --create --if-not-exists \
    --topic "$prefix$kind" --partitions "$parts" --replication-factor 1 \
    --config "retention.ms=$retention" --config "max.message.bytes=$max_bytes"
done
/opt/kafka/bin/kafka-topics.sh --bootstrap-server "$bootstrap" --list
