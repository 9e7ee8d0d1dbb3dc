"""A stand-alone processor for the crash and shutdown tests (run as a subprocess)."""

import argparse
import os
import signal
import threading
import time

from onpolicy import messages as m
from onpolicy.bus import Output, Processor, ProcessorConfig, Producer
from onpolicy.settings import KafkaSettings, TopicSettings
from onpolicy.telemetry import Metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--crash-after-produce", action="store_true")
    parser.add_argument("--exit-when-idle", action="store_true")
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--mark")
    args = parser.parse_args()
    kafka = KafkaSettings(
        bootstrap_servers=os.environ["BOOTSTRAP"],
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
    )
    topics = TopicSettings(prefix=os.environ["PREFIX"])
    producer = Producer(kafka)
    done = threading.Event()

    def handler(record):
        if args.mark:  # one line per handler call
            with open(args.mark, "a") as mark:
                mark.write(f"{record.message.text}\n")
        time.sleep(args.slow)
        group = m.CompletionGroup(
            prompt_id=record.message.id,
            prompt=record.message,
            completions=[m.Completion(text="echo")],
        )
        if args.crash_after_produce:
            producer.send_sync(topics.name("completions"), group)
            os.kill(os.getpid(), signal.SIGKILL)  # dies before the offset is committed
        done.set()
        return [Output(topics.name("completions"), group)]

    processor = Processor(
        kafka=kafka,
        source=topics.name("prompts"),
        message_type=m.Prompt,
        handler=handler,
        config=ProcessorConfig(group_id=f"{topics.prefix}echo", drain_timeout_s=20),
        metrics=Metrics("echo"),
        dead_letter_topic=topics.name("dlq"),
        producer=producer,
    )
    if args.exit_when_idle:

        def stopper() -> None:
            done.wait(120)
            time.sleep(1)  # let the commit go out
            processor.stop()

        threading.Thread(target=stopper, daemon=True).start()
    processor.run()
    producer.close()


if __name__ == "__main__":
    main()
