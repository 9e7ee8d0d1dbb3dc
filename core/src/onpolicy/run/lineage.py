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

from onpolicy import ids
from onpolicy import messages as m
from onpolicy.bus import Producer, ensure_topics
from onpolicy.run.procs import RestartPolicy, ServiceProcess, wait_for
from onpolicy.run.settings import RunSettings
from onpolicy.run.tail import TopicTail
from onpolicy.secrets import split_secrets, write_private
from onpolicy.settings import KafkaSettings, TopicSettings

log = logging.getLogger(__name__)

# A protocol round that has planned every published prompt and made no progress for this
# long needs more prompts (the trainer trains a short round after its round_timeout_s, 30 s,
# when it has any pair at all).
STALL_S = 60.0

Status = Callable[[str], None]


@dataclass
class RoundRecord:
    round: int
    policy_version: int
    pairs: int = 0
    train_groups: int = 0
    train_reward_mean: float | None = None
    # The held-out evaluation of this version, as the services published it (EvalResult).
    eval_reward_mean: float | None = None
    eval_reward_se: float | None = None
    eval_prompts: int = 0
    eval_completion_tokens_mean: float | None = None
    eval_finished_rate: float | None = None
    eval_verdict: str | None = None
    # The guard rejected this round's policy: the next version carries the weights of this
    # earlier one, and the round's pairs were dropped (rolled_back), not trained.
    restored_version: int | None = None
    sampling_s: float = 0.0
    judging_s: float = 0.0
    training_s: float = 0.0
    loading_s: float = 0.0
    # Overlap mode: seconds the sampler worked on this round's training prompts while the
    # previous round trained and loaded, i.e. wall time saved against strict mode.
    overlap_s: float = 0.0
    completion_tokens: int = 0
    train_metrics: dict[str, float] = field(default_factory=dict)

    def take_evaluation(self, result: m.EvalResult) -> None:
        """This version's held-out figures, as the services' EvalResult gives them."""
        self.eval_reward_mean = result.mean
        self.eval_reward_se = result.se
        self.eval_prompts = result.prompts
        self.eval_completion_tokens_mean = result.mean_tokens
        self.eval_finished_rate = result.finished_rate
        self.eval_verdict = result.verdict

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
        heldout: list[m.Prompt] | None = None,
        protocol: bool = False,
    ):
        self.name = name
        # The round protocol (the services plan, sample and train the rounds; the run
        # publishes and watches) or rounds driven by the run (the off-policy comparison).
        self.protocol = protocol
        self.heldout = list(heldout or [])
        self.published_train = 0  # training prompts this run published
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
                "round_protocol": protocol,
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
                # Protocol: the trainer plans rounds of prompts_per_round pairs (and trains a
                # short one once the published prompts run out). Driven: the loop triggers
                # each round once every pair of it is in.
                "round_size": settings.prompts_per_round if protocol else 100_000,
                "round_protocol": protocol,
                "round_timeout_s": 30.0 if protocol else 86_400.0,
                # The run's R rounds, then no more sampling (it evaluates the last version).
                **({"max_version": settings.rounds} if protocol else {}),
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
        self.evals = TopicTail(self.kafka, self.topics.name("evals"), m.EvalResult)
        self.plans = TopicTail(self.kafka, self.topics.name("rounds"), m.RoundPlan)
        # Before the services start, so that v0's evaluation expects every held-out prompt.
        self.publish(self.heldout, "heldout")
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
        for tail in ("completions", "scored", "pairs", "policy", "evals", "plans"):
            if hasattr(self, tail):
                getattr(self, tail).close()
        if hasattr(self, "producer"):
            self.producer.close()

    def wait(self, check: Callable[[], bool], what: str) -> float:
        return wait_for(check, self.settings.stage_timeout_s, what, list(self.services.values()))

    # ------------------------------------------------------------------ views
    def refresh(self) -> None:
        for tail in (
            self.completions,
            self.scored,
            self.pairs,
            self.policy,
            self.evals,
            self.plans,
        ):
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
    def publish(self, prompts: list[m.Prompt], kind: str = "prompts") -> None:
        futures = [self.producer.send(self.topics.name(kind), p) for p in prompts]  # type: ignore[arg-type]
        for future in futures:
            future.result(60)
        if kind == "prompts":
            self.published_train += sum(p.dataset_split == "train" for p in prompts)

    def sample_and_judge(
        self, record: RoundRecord, train: list[m.Prompt], published_earlier: int = 0
    ) -> None:
        """Publish a round's training prompts; wait until every group is sampled and scored
        and the services have published the evaluation of the round's policy.

        The held-out prompts are on the `heldout` topic (published once, at the start): the
        samplers sample them with every version they serve, the trainer's evaluator publishes
        each version's EvalResult, the same evaluation a deployment runs.
        ``published_earlier`` counts this round's training prompts that went out before
        (overlap mode), which are waited for too.
        """
        r = record.round
        started = time.monotonic()
        self.publish(train)
        want = len(train) + published_earlier
        # Train groups of this round count only when this call waits for them: the off-policy
        # lineage publishes every round's train prompts up front, and counting those would end
        # its later waits before their evaluation is sampled.
        splits = ("train",) if train or published_earlier else ()

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

        def evaluated() -> m.EvalResult | None:
            return self.evals.by_id.get(ids.eval_id(record.policy_version))

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
            return have >= want and (not self.heldout or evaluated() is not None)

        self.wait(judged, f"round {r} scores and the evaluation of v{record.policy_version}")
        record.judging_s = time.monotonic() - started - record.sampling_s
        # Pairs go out with the scores; give the judge a moment to flush the last ones.
        time.sleep(0.5)
        self.refresh()

        groups = self._of(self.completions, r, "train")
        record.completion_tokens = sum(c.num_tokens for g in groups for c in g.completions)
        train_scores = [s for x in self._of(self.scored, r, "train") for s in x.scores]
        record.train_groups = len(self._of(self.scored, r, "train"))
        record.train_reward_mean = statistics.fmean(train_scores) if train_scores else None
        if (result := evaluated()) is not None:
            record.take_evaluation(result)
        record.pairs = len(self._of(self.pairs, r, "train"))

    def train(self, record: RoundRecord) -> None:
        """Driven rounds (the off-policy comparison): trigger a round on ``record.pairs``
        pairs once the trainer holds them; wait for the next policy to be published and
        loaded by the sampler."""
        expected = record.pairs
        if expected == 0:
            # Every group tied (or failed): nothing to learn from, so no round and no new
            # version; the next round samples again with the same policy.
            self.status(
                f"[{self.name}] round {record.round}: no preference pairs (every group "
                f"tied); the policy stays v{record.policy_version}",
                final=True,
            )
            return
        trainer = self.services["trainer"]
        until = self.wait

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
        if update.HasField("restored_version"):
            record.restored_version = update.restored_version
            self.status(
                f"[{self.name}] the guard rejected v{record.policy_version}: v{target} carries "
                f"the weights of v{update.restored_version}",
                final=True,
            )
        record.train_metrics = {
            k: float(v) for k, v in update.metrics.items() if isinstance(v, int | float)
        }
        started = time.monotonic()
        self.status(f"[{self.name}] loading policy v{target} into vLLM")
        until(lambda: self.sampler_version() >= target, f"the sampler to load v{target}")
        record.loading_s = time.monotonic() - started

    def watch(self, record: RoundRecord, final: bool, more: Callable[[], int] = lambda: 0) -> None:
        """Round protocol: follow what the services do with policy ``record.policy_version``
        until it is evaluated and (unless ``final``) the next version is published and served.

        ``more`` publishes further training prompts (returns how many): asked when the round
        has planned every prompt published so far and nothing moved for ``STALL_S`` (its
        groups made too few pairs); none left is an error that says so.

        The figures come from the topics: the groups this version sampled, their scores and
        pairs, the PolicyUpdate of the round it sampled for, its EvalResult; the times from
        when this loop first saw each of them (it looks twice a second).
        """
        v = record.policy_version
        target = v + 1
        started = time.monotonic()
        last_group = last_score = published_at = None
        counts = (0, 0)
        arrivals: list[float] = []  # when new groups of this version were seen
        progress: tuple = ()
        moved = started

        def starved(now: float) -> bool:
            """Every published prompt planned, and nothing happening: the round needs more."""
            nonlocal progress, moved
            newest: dict[int, m.RoundPlan] = {}
            for p in self.plans.records:
                if p.round not in newest or p.seq > newest[p.round].seq:
                    newest[p.round] = p
            seqs = tuple(sorted((r, p.seq) for r, p in newest.items()))
            mark = (counts, len(self.pairs.records), seqs)
            if mark != progress:
                progress, moved = mark, now
                return False
            planned = sum(p.train_prompts for p in newest.values())
            return now - moved > STALL_S and planned >= self.published_train

        def mine(tail: TopicTail) -> list:
            def group_of(x):
                return x.group if isinstance(x, m.ScoredGroup) else x

            return [
                x
                for x in tail.records
                if group_of(x).policy_version == v and group_of(x).prompt.dataset_split == "train"
            ]

        def update() -> m.PolicyUpdate | None:
            return next((u for u in self.policy.records if u.version == target), None)

        def done() -> bool:
            nonlocal last_group, last_score, published_at, counts, moved
            self.refresh()
            now = time.monotonic()
            have = (len(mine(self.completions)), len(mine(self.scored)))
            if have[0] > counts[0]:
                last_group = now
                arrivals.append(now)
            if have[1] > counts[1]:
                last_score = now
            counts = have
            plan = max(
                (p for p in self.plans.records if p.round == target),
                key=lambda p: p.seq,
                default=None,
            )
            evaluated = self.evals.by_id.get(ids.eval_id(v)) is not None or not self.heldout
            if final:
                self.status(f"[{self.name}] v{v}: evaluating on the held-out prompts")
                return evaluated
            planned = f"{plan.train_prompts} prompts planned" if plan else "no plan yet"
            self.status(
                f"[{self.name}] round {record.round} (v{v} samples, {planned}): "
                f"{have[0]} groups sampled, {have[1]} judged, "
                f"{sum(p.policy_version == v for p in self.pairs.records)} pairs"
                + ("" if evaluated else ", evaluating")
            )
            if update() is None:
                if starved(now):
                    added = more()
                    if not added:
                        raise RuntimeError(
                            f"the prompt set ran out: {self.published_train} training prompts "
                            f"made too few pairs for round {target} (prompts_per_round "
                            f"{self.settings.prompts_per_round}); give more prompts, set "
                            "prompt_epochs, or lower prompts_per_round"
                        )
                    self.status(
                        f"[{self.name}] round {target} is short of pairs: published "
                        f"{added} more training prompts",
                        final=True,
                    )
                    moved = now
                return False
            published_at = published_at or now
            return evaluated and self.sampler_version() >= target

        self.wait(done, f"policy v{v}'s round and evaluation" if not final else f"v{v} evaluated")
        end = time.monotonic()
        groups = mine(self.completions)
        scored = mine(self.scored)
        record.completion_tokens = sum(c.num_tokens for g in groups for c in g.completions)
        record.train_groups = len(scored)
        scores = [s for x in scored for s in x.scores]
        record.train_reward_mean = statistics.fmean(scores) if scores else None
        record.sampling_s = ((last_group or started) - started) if groups else 0.0
        record.judging_s = max((last_score or started) - (last_group or started), 0.0)
        if (result := self.evals.by_id.get(ids.eval_id(v))) is not None:
            record.take_evaluation(result)
        if final or (new := update()) is None:
            return
        record.pairs = new.num_pairs
        record.train_metrics = {
            k: float(x) for k, x in new.metrics.items() if isinstance(x, int | float)
        }
        record.training_s = float(record.train_metrics.get("seconds", 0.0))
        record.loading_s = max(end - (published_at or end), 0.0)
        # Overlap mode: this version kept sampling (the next round's prompts) while the
        # trainer trained the round it sampled for: wall time saved against strict mode.
        if published_at is not None and self.settings.max_staleness > 0:
            window = published_at - record.training_s
            during = [t for t in arrivals if window <= t <= published_at]
            record.overlap_s = (max(during) - window) if during else 0.0
        if new.HasField("restored_version"):
            record.restored_version = new.restored_version
            self.status(
                f"[{self.name}] the guard rejected v{v}: v{target} carries the weights of "
                f"v{new.restored_version}; the pairs v{v} sampled were dropped",
                final=True,
            )

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
