"""One pipeline of the loop: its topics, its three services and its rounds.

The on-policy run is one lineage; ``--compare-offpolicy`` adds a second one on its own topics
whose training prompts are all sampled by the initial policy.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from onpolicy import messages as m
from onpolicy.bus import Producer, ensure_topics
from onpolicy.run.procs import RestartPolicy, ServiceProcess, wait_for
from onpolicy.run.settings import RunSettings
from onpolicy.run.tail import TopicTail
from onpolicy.secrets import split_secrets, write_private
from onpolicy.settings import KafkaSettings, TopicSettings

log = logging.getLogger(__name__)

Status = Callable[[str], None]


@dataclass
class Ahead:
    """The next round's training prompts, published early (overlap mode)."""

    round: int
    groups: int
    published_at: float  # time.monotonic()


@dataclass
class RoundRecord:
    round: int
    policy_version: int
    pairs: int = 0
    train_groups: int = 0
    train_reward_mean: float | None = None
    eval_reward_mean: float | None = None
    eval_reward_std: float | None = None
    eval_completion_tokens_mean: float | None = None
    eval_finished_rate: float | None = None
    sampling_s: float = 0.0
    judging_s: float = 0.0
    training_s: float = 0.0
    loading_s: float = 0.0
    # Overlap mode: seconds the sampler worked on this round's training prompts while the
    # previous round trained and loaded, i.e. wall time saved against strict mode.
    overlap_s: float = 0.0
    completion_tokens: int = 0
    train_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def next_version(self) -> int:
        """The policy after this round: a round without pairs trains nothing (``train``)."""
        return self.policy_version + 1 if self.pairs else self.policy_version


def tagged(
    prompt: m.Prompt,
    round_: int,
    split: str,
    sampling: dict[str, Any] | None = None,
    num_samples: int | None = None,
) -> m.Prompt:
    """A copy of ``prompt`` for one round: its own id, so it is never taken for a duplicate."""
    out = m.Prompt()
    out.CopyFrom(prompt)
    out.id = f"{prompt.id}:{split}:r{round_}"
    out.round = round_
    out.dataset_split = split
    for key, value in (sampling or {}).items():
        if not out.sampling.HasField(key):
            setattr(out.sampling, key, value)
    if num_samples is not None and not out.HasField("num_samples"):
        out.num_samples = num_samples
    return m.validate(out)


class Lineage:
    def __init__(
        self,
        *,
        name: str,
        settings: RunSettings,
        run_dir: Path,
        kafka: KafkaSettings,
        prefix: str,
        vllm_url: str,
        served_model_name: str,
        model_path: Path,
        status: Status,
        sampler_extra: dict[str, Any] | None = None,
        trainer_extra: dict[str, Any] | None = None,
    ):
        self.name = name
        self.settings = settings
        self.dir = run_dir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.kafka = kafka
        self.topics = TopicSettings(prefix=prefix, partitions=2)
        self.status = status
        self.rounds: list[RoundRecord] = []
        config = {
            "kafka": kafka.model_dump(mode="json", exclude_none=True),
            "topics": self.topics.model_dump(mode="json"),
            "log": {"level": "INFO"},
            "sampler": {
                "vllm_url": vllm_url,
                "served_model_name": served_model_name,
                "num_samples": settings.num_samples,
                "max_tokens": settings.max_tokens,
                "max_prompt_tokens": settings.max_prompt_tokens,
                "temperature": settings.temperature,
                "concurrency": 32,
                "adapter_cache_dir": str(self.dir / "adapter-cache"),
                # Adapters only from this lineage's own checkpoint store.
                "adapter_uri_prefixes": [str(self.dir / "checkpoints")],
                # The loop publishes each round's prompts itself and drives the trainer.
                "round_protocol": False,
                **(sampler_extra or {}),
                **settings.sampler,
            },
            "judge": {
                "backend": "function",
                "functions": [{"name": "concise"}],
                "grpc": {"port": 0},
                **settings.judge,
            },
            "trainer": {
                "model": str(model_path),
                "checkpoint_uri": str(self.dir / "checkpoints"),
                # Rounds are triggered by the loop once every pair of the round is in.
                "round_size": 100_000,
                "round_protocol": False,
                "round_timeout_s": 86_400.0,
                "max_staleness": settings.max_staleness,
                "seed": settings.seed,
                **(trainer_extra or {}),
                **settings.trainer,
            },
        }
        # Secrets (the SASL password, API keys) never reach the file: the services get them
        # as environment variables, which they read before the YAML file.
        secret_env: dict[str, str] = {}
        kafka_cfg = config["kafka"]
        if kafka.sasl_password is not None:  # model_dump masks it; the services need it
            kafka_cfg["sasl_password"] = kafka.sasl_password.get_secret_value()
        config["kafka"], found = split_secrets(kafka_cfg, "ONPOLICY_KAFKA__")
        secret_env |= found
        for svc in ("sampler", "judge", "trainer"):
            config[svc], found = split_secrets(config[svc], f"ONPOLICY_{svc.upper()}_")
            secret_env |= found
        self.config_file = self.dir / "config.yaml"
        write_private(self.config_file, yaml.safe_dump(config, sort_keys=False))
        env = {
            "ONPOLICY_CONFIG": str(self.config_file),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **secret_env,
        }
        policy = RestartPolicy(
            max_restarts=settings.max_restarts,
            backoff_s=settings.restart_backoff_s,
            max_backoff_s=settings.restart_max_backoff_s,
        )
        self.services = {
            svc: ServiceProcess(svc, self.dir / f"{svc}.log", dict(env), policy=policy)
            for svc in ("sampler", "judge", "trainer")
        }

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        ensure_topics(self.kafka, self.topics)
        self.producer = Producer(self.kafka, client_id=f"onpolicy-run-{self.name}")
        self.completions = TopicTail(self.kafka, self.topics.name("completions"), m.CompletionGroup)
        self.scored = TopicTail(self.kafka, self.topics.name("scored"), m.ScoredGroup)
        self.pairs = TopicTail(self.kafka, self.topics.name("pairs"), m.PreferencePair)
        self.policy = TopicTail(self.kafka, self.topics.name("policy"), m.PolicyUpdate)
        for service in self.services.values():
            service.start()
        self.status(f"[{self.name}] starting sampler, judge and trainer")
        self.wait(lambda: all(s.ready() for s in self.services.values()), "services ready")

    def stop(self) -> None:
        for service in self.services.values():
            # Keep what each service measured: the run folder outlives the processes.
            with contextlib.suppress(Exception):
                (self.dir / f"{service.name}.metrics.txt").write_text(service.get("/metrics").text)
        for service in self.services.values():
            code = service.stop()
            if code not in (0, None):
                log.warning("%s exited with %s; see %s", service.name, code, service.log_file)
        for tail in ("completions", "scored", "pairs", "policy"):
            if hasattr(self, tail):
                getattr(self, tail).close()
        if hasattr(self, "producer"):
            self.producer.close()

    def wait(self, check: Callable[[], bool], what: str) -> float:
        return wait_for(check, self.settings.stage_timeout_s, what, list(self.services.values()))

    # ------------------------------------------------------------------ views
    def refresh(self) -> None:
        for tail in (self.completions, self.scored, self.pairs, self.policy):
            tail.refresh(timeout_ms=50)

    def sampler_version(self) -> int:
        return int(self.services["sampler"].get("/policy").json()["version"])

    def trainer_state(self) -> dict[str, Any]:
        return self.services["trainer"].get("/policy").json()

    def _of(self, tail: TopicTail, round_: int, split: str) -> list:
        def prompt_of(msg):
            return msg.group.prompt if isinstance(msg, m.ScoredGroup) else msg.prompt

        return [
            x
            for x in tail.records
            if prompt_of(x).round == round_ and prompt_of(x).dataset_split == split
        ]

    # ------------------------------------------------------------------ stages
    def publish(self, prompts: list[m.Prompt]) -> None:
        futures = [self.producer.send(self.topics.name("prompts"), p) for p in prompts]
        for future in futures:
            future.result(60)

    def sample_and_judge(
        self,
        record: RoundRecord,
        train: list[m.Prompt],
        evaluation: list[m.Prompt],
        published_earlier: int = 0,
    ) -> None:
        """Publish a round's prompts and wait until every group is sampled and scored.

        ``published_earlier`` counts this round's training prompts that went out before
        (overlap mode), which are waited for too.
        """
        r = record.round
        started = time.monotonic()
        self.publish(evaluation + train)
        want = len(train) + len(evaluation) + published_earlier
        # Train groups of this round count only when this call waits for them: the off-policy
        # lineage publishes every round's train prompts up front, and counting those would end
        # its later waits before their evaluation is sampled.
        splits = ("train", "eval") if train or published_earlier else ("eval",)

        def count(tail: TopicTail) -> int:
            return sum(len(self._of(tail, r, split)) for split in splits)

        def produced() -> int:
            return count(self.completions)

        def progress(what: str, have: int) -> None:
            tokens = sum(
                c.num_tokens
                for g in self.completions.records
                if g.prompt.round == r
                for c in g.completions
            )
            rate = tokens / max(time.monotonic() - started, 1e-6)
            self.status(
                f"[{self.name}] round {r}: {what} {have}/{want} groups, "
                f"{rate:.0f} tok/s, pairs so far {len(self.pairs.records)}"
            )

        def sampled() -> bool:
            self.refresh()
            progress("sampling", produced())
            return produced() >= want

        self.wait(sampled, f"round {r} samples")
        record.sampling_s = time.monotonic() - started

        def judged() -> bool:
            self.refresh()
            have = count(self.scored)
            progress("judging", have)
            return have >= want

        self.wait(judged, f"round {r} scores")
        record.judging_s = time.monotonic() - started - record.sampling_s
        # Pairs go out with the scores; give the judge a moment to flush the last ones.
        time.sleep(0.5)
        self.refresh()

        groups = self._of(self.completions, r, "train") + self._of(self.completions, r, "eval")
        record.completion_tokens = sum(c.num_tokens for g in groups for c in g.completions)
        train_scores = [s for x in self._of(self.scored, r, "train") for s in x.scores]
        record.train_groups = len(self._of(self.scored, r, "train"))
        record.train_reward_mean = statistics.fmean(train_scores) if train_scores else None
        evals = self._of(self.scored, r, "eval")
        eval_scores = [s for x in evals for s in x.scores]
        if eval_scores:
            record.eval_reward_mean = statistics.fmean(eval_scores)
            record.eval_reward_std = statistics.pstdev(eval_scores)
            comps = [c for x in evals for c in x.group.completions]
            record.eval_completion_tokens_mean = statistics.fmean(c.num_tokens for c in comps)
            record.eval_finished_rate = sum(c.finish_reason == "stop" for c in comps) / len(comps)
            versions = {x.group.policy_version for x in evals}
            if versions != {record.policy_version}:
                log.warning("round %d evaluation sampled by versions %s", r, sorted(versions))
        record.pairs = len(self._of(self.pairs, r, "train"))

    def train(self, record: RoundRecord, ahead: Ahead | None = None) -> float:
        """Trigger a round on ``record.pairs`` pairs once the trainer holds them; wait for the
        next policy to be published and loaded by the sampler.

        ``ahead`` (overlap mode) names the next round's training prompts, already published:
        returns how long the sampler worked on them before this round's policy was loaded.
        """
        expected = record.pairs
        if expected == 0:
            # Every group tied (or failed): nothing to learn from, so no round and no new
            # version; the next round samples again with the same policy.
            self.status(
                f"[{self.name}] round {record.round}: no preference pairs (every group "
                f"tied); the policy stays v{record.policy_version}",
                final=True,
            )
            return 0.0
        trainer = self.services["trainer"]
        done_at: float | None = None

        def watch_ahead() -> None:
            nonlocal done_at
            if ahead is not None and done_at is None:
                self.completions.refresh(timeout_ms=50)
                if len(self._of(self.completions, ahead.round, "train")) >= ahead.groups:
                    done_at = time.monotonic()

        def until(check: Callable[[], bool], what: str) -> None:
            self.wait(lambda: (watch_ahead() or True) and check(), what)

        triggered_on = -1  # the trainer process (its restart count) the round was triggered on

        def trigger() -> bool:
            """Trigger the round once the trainer holds its pairs; again on a trainer that
            restarted since (it lost the round; Kafka redelivers the uncommitted pairs)."""
            nonlocal triggered_on
            if triggered_on == len(trainer.restarts):
                return True
            if self.trainer_state()["buffered_pairs"] < expected:
                return False
            # Exactly this round's pairs: later ones (overlap mode, off-policy) stay buffered.
            response = trainer.post(f"/rounds/trigger?max_pairs={expected}")
            if response.status_code >= 400:
                raise RuntimeError(f"trainer refused the round: {response.text}")
            triggered_on = len(trainer.restarts)
            return True

        self.status(
            f"[{self.name}] round {record.round}: waiting for the trainer to buffer "
            f"{expected} pairs"
        )
        until(
            lambda: self.trainer_state()["buffered_pairs"] >= expected,
            f"the trainer to buffer {expected} pairs",
        )
        started = time.monotonic()
        target = record.policy_version + 1
        until(trigger, f"the trainer to take the round of {expected} pairs")
        self.status(f"[{self.name}] round {record.round}: DPO on {expected} pairs -> v{target}")

        def published() -> bool:
            self.policy.refresh(timeout_ms=200)
            if any(u.version == target for u in self.policy.records):
                return True
            trigger()  # no-op unless the trainer restarted since
            return False

        until(published, f"policy v{target}")
        record.training_s = time.monotonic() - started
        update = next(u for u in self.policy.records if u.version == target)
        record.train_metrics = {
            k: float(v) for k, v in update.metrics.items() if isinstance(v, int | float)
        }
        started = time.monotonic()
        self.status(f"[{self.name}] loading policy v{target} into vLLM")
        until(lambda: self.sampler_version() >= target, f"the sampler to load v{target}")
        record.loading_s = time.monotonic() - started
        if ahead is None:
            return 0.0
        watch_ahead()
        end = time.monotonic()
        return min(done_at or end, end) - ahead.published_at

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rounds]

    def restarts(self) -> list[dict[str, Any]]:
        """Every restart of this lineage's services, in the order they happened."""
        out = [
            {"lineage": self.name, **asdict(r)}
            for service in self.services.values()
            for r in service.restarts
        ]
        return sorted(out, key=lambda r: r["exited_at"])
