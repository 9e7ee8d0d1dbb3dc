"""Rounds: buffer streamed pairs, train, save, publish, and only then let offsets commit.

The processor commits a record once its handler returns. The handler parks each admitted
pair in the buffer and awaits its round's future; the round (training in a worker thread)
saves the policy and dataset, publishes the PolicyUpdate, then resolves the futures. So a
crash anywhere before the publish leaves every pair of the round uncommitted (redelivered),
and the store and the policy topic tell a restarted trainer what was already done:

- a saved round whose PolicyUpdate is missing from the topic is published, not retrained;
- a version already in the topic is never published again;
- redelivered pairs of a saved round are recognised by pair id (from the saved datasets)
  and dropped as duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from google.protobuf.struct_pb2 import Struct
from kafka.errors import KafkaError

from onpolicy import messages as m
from onpolicy.bus import Output, Producer, Record, read_topic
from onpolicy.telemetry import Metrics
from onpolicy_trainer import hub
from onpolicy_trainer.dpo import RoundAborted, RoundResult, train_round, zero_adapter
from onpolicy_trainer.evaluation import REJECTED, Evaluator
from onpolicy_trainer.merge import merge_adapter
from onpolicy_trainer.pairs import admit, min_version, pair_length, to_rows
from onpolicy_trainer.settings import TrainerSettings
from onpolicy_trainer.store import CheckpointStore, SavedRound

log = logging.getLogger(__name__)

# Test hook: SIGKILL the process at a named point of a round ("after_save", "after_publish"),
# optionally only for one version ("after_save@2"). Used by the crash-safety tests.
CRASH_ENV = "ONPOLICY_TRAINER_CRASH_AT"


class TrainFn(Protocol):
    def __call__(
        self,
        settings: TrainerSettings,
        rows: list[dict[str, Any]],
        previous_adapter: Path | None,
        output_dir: Path,
        should_stop: Callable[[], bool] | None = None,
    ) -> RoundResult: ...


def _crash_point(stage: str, version: int) -> None:
    wanted = os.environ.get(CRASH_ENV, "")
    if not wanted:
        return
    name, _, at = wanted.partition("@")
    if name == stage and (not at or int(at) == version):
        log.error("test hook %s=%s: killing the trainer", CRASH_ENV, wanted)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class RoundInfo:
    version: int
    num_pairs: int
    metrics: dict[str, float]
    policy_uri: str
    dataset_uri: str
    created_unix_ms: int
    published: bool

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def policy_update(saved: SavedRound) -> m.PolicyUpdate:
    """The PolicyUpdate of a saved round (the same record whether first sent or resent)."""
    metrics = Struct()
    metrics.update({k: float(v) for k, v in saved.meta.get("metrics", {}).items()})
    update = m.PolicyUpdate(
        version=saved.version,
        base_model=saved.meta.get("base_model", ""),
        metrics=metrics,
        created_unix_ms=int(saved.meta.get("created_unix_ms", 0)),
        num_pairs=int(saved.meta.get("num_pairs", 0)),
    )
    if saved.full_model:
        update.checkpoint_uri = saved.uri
    else:
        update.adapter_uri = saved.uri
        if merged := saved.meta.get("merged_uri"):
            update.checkpoint_uri = merged  # handoff=merged: the samplers reload this
    if "restored_version" in saved.meta:
        update.restored_version = int(saved.meta["restored_version"])
        update.rejected_version = int(saved.meta["rejected_version"])
    return m.validate(update)


class RoundRunner:
    """The trainer's state machine; ``handle`` is the processor's (async) handler."""

    def __init__(
        self,
        settings: TrainerSettings,
        metrics: Metrics,
        producer: Producer,
        store: CheckpointStore | None = None,
        train: TrainFn = train_round,
        evaluator: Evaluator | None = None,
    ):
        self.settings = settings
        self.producer = producer
        self.store = store or CheckpointStore(settings.checkpoint_uri)
        self.train = train
        # The regression guard asks it for the verdict of the policy that sampled a round.
        self.evaluator = evaluator
        self.policy_topic = settings.topics.name("policy")
        self.current = 0
        self.latest: SavedRound | None = None
        self.rounds: list[RoundInfo] = []
        self.seen: set[str] = set()  # pair ids of saved rounds
        self.claimed: set[str] = set()  # pair ids buffered or in the running round
        self.buffer: list[tuple[m.PreferencePair, asyncio.Future[None]]] = []
        self.dropped = {
            "stale": 0,
            "duplicate": 0,
            "held_out": 0,
            "too_long": 0,
            "no_token_ids": 0,
            "rolled_back": 0,  # sampled by a policy the guard rejected
        }
        self.rejected: set[str] = set()  # ids of dropped pairs (a planned round skips them)
        # Versions the guard rejected and rolled back (from the policy topic): what they
        # sampled is never trained.
        self.rejected_versions: set[int] = set()
        self.restores: set[int] = set()  # versions published with an earlier one's weights
        self._budget_warned = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._force = False
        self._force_size: int | None = None  # a triggered round's size (POST ?max_pairs=)
        self._cache = Path(tempfile.gettempdir()) / "onpolicy-trainer-cache"
        # Asked during training; the service wires it to its processor's stop (SIGTERM).
        self.stopping: Callable[[], bool] = lambda: False

        self.m_rounds = metrics.counter("rounds_total", "DPO rounds completed")
        self.m_failures = metrics.counter("round_failures_total", "DPO rounds that failed")
        self.m_round_s = metrics.histogram("round_seconds", "Round duration: train + save")
        self.m_pairs = metrics.counter("pairs_trained_total", "Pairs trained on")
        self.m_dropped = metrics.counter(
            "pairs_dropped_total", "Pairs dropped before training", ("reason",)
        )
        self.m_buffer = metrics.gauge("buffer_pairs", "Pairs waiting for the next round")
        self.m_fill = metrics.gauge("buffer_fill_ratio", "Buffered pairs / round_size")
        self.m_version = metrics.gauge("policy_version", "Current policy version")
        self.m_pairs_per_s = metrics.gauge("pairs_per_second", "Last round's pairs/s")
        self.m_lag = metrics.histogram(
            "pair_version_lag",
            "Current version minus the version that sampled each admitted pair",
            buckets=(0, 1, 2, 3, 5, 8),
        )
        self.m_rollbacks = metrics.counter(
            "policy_rollbacks_total", "Versions published with an earlier version's weights"
        )
        self.m_round = metrics.gauge("round_metric", "Last round's training metrics", ("name",))
        # The DPO headline figures, one gauge each (what dashboards plot per round).
        self.m_headline = {
            key: metrics.gauge(key.replace("/", "_"), f"Last round's {key} (TRL)")
            for key in (
                "loss",
                "rewards/chosen",
                "rewards/rejected",
                "rewards/margins",
                "rewards/accuracies",
            )
        }
        for reason in self.dropped:
            self.m_dropped.labels(reason)

    # ------------------------------------------------------------------ start-up
    def recover(self) -> None:
        """Find the current version; publish saved-but-unpublished rounds; learn seen pairs."""
        self.store.clean_incomplete()
        saved = self.store.rounds()
        updates = [
            r.message for r in read_topic(self.producer.kafka, self.policy_topic, m.PolicyUpdate)
        ]
        published = {u.version for u in updates}
        self.rejected_versions |= {
            u.rejected_version for u in updates if u.HasField("rejected_version")
        }
        self.restores |= {u.version for u in updates if u.HasField("restored_version")}
        for round_ in saved:
            self.seen.update(self.store.pair_ids(round_.version))
            if "rejected_version" in round_.meta:
                self.rejected_versions.add(int(round_.meta["rejected_version"]))
                self.restores.add(round_.version)
            if round_.version not in published:
                log.warning(
                    "policy-v%d was saved but never published: publishing it", round_.version
                )
                self.producer.send_sync(self.policy_topic, policy_update(round_))
                published.add(round_.version)
            self.rounds.append(self._info(round_, published=True))
        self.latest = saved[-1] if saved else None
        self.current = max([0, *published, *(r.version for r in saved)])
        if self.latest and self.latest.version < self.current:
            log.warning(
                "the policy topic is at v%d but the store only has up to v%d: continuing from it",
                self.current,
                self.latest.version,
            )
        self.m_version.set(self.current)
        log.info(
            "current policy v%d (%d saved rounds, %d known pair ids) in %s",
            self.current,
            len(saved),
            len(self.seen),
            self.store.uri(),
        )

    @staticmethod
    def _info(saved: SavedRound, published: bool) -> RoundInfo:
        return RoundInfo(
            version=saved.version,
            num_pairs=int(saved.meta.get("num_pairs", 0)),
            metrics=dict(saved.meta.get("metrics", {})),
            policy_uri=saved.uri,
            dataset_uri=saved.dataset_uri,
            created_unix_ms=int(saved.meta.get("created_unix_ms", 0)),
            published=published,
        )

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the handlers run on: rounds and rollbacks are scheduled onto it."""
        self._loop = loop
        self._lock = asyncio.Lock()

    def release_waiting(self) -> None:
        """At stop: the buffered pairs no round has taken are let go (their handlers return
        unfinished, so their offsets stay uncommitted and the next owner gets them again)
        instead of holding the drain until its timeout and the stop past its grace period.
        A running round's pairs stay: it finishes or is cut short as before. Called from the
        processor's polling thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def release() -> None:
            if self.buffer:
                log.info("stopping: %d buffered pairs left for redelivery", len(self.buffer))
            for pair, future in self.buffer:
                self.claimed.discard(pair.id)
                future.cancel()
            self.buffer.clear()
            self._buffer_changed()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        loop.call_soon_threadsafe(release)

    # ------------------------------------------------------------------ the handler
    async def handle(self, record: Record[m.PreferencePair]) -> list[Output]:
        if self._loop is None:
            self.bind(asyncio.get_running_loop())
        pair = record.message
        # Buffered or training ids count as seen too (the bus already holds back a copy of a
        # record still being handled; this guards the buffer itself).
        if pair.id in self.claimed:
            verdict = "duplicate"
        else:
            verdict = admit(
                pair,
                self.current,
                self.settings.max_staleness,
                self.seen,
                self.settings.max_length,
            )
        if verdict in ("ok", "stale") and pair.policy_version in self.rejected_versions:
            verdict = "rolled_back"  # the more telling reason of the two
        if verdict != "ok":
            self._drop(verdict, pair)
            return []  # nothing to train: its offset may commit
        self._check_budget(pair)
        self.m_lag.observe(self.current - pair.policy_version)
        future: asyncio.Future[None] = self._loop.create_future()
        self.claimed.add(pair.id)
        self.buffer.append((pair, future))
        self._buffer_changed()
        if self.settings.round_protocol:
            pass  # the planner says which pairs make a round, and when (planner.py)
        elif len(self.buffer) >= self.settings.round_size:
            self._schedule()
        elif self._timer is None:
            self._timer = self._loop.call_later(self.settings.round_timeout_s, self._on_timeout)
        await future  # resolved once the round is saved and published; raises if it failed
        return []

    def _check_budget(self, pair: m.PreferencePair) -> None:
        """Say once, naming both settings, when the sampler may draw pairs this trainer must
        drop: its prompt plus the sampler's max_tokens exceed max_length (a deployment's
        services do not share settings; the pairs carry the sampler's)."""
        worst = len(pair.prompt_token_ids) + pair.sampling.max_tokens
        if self._budget_warned or not pair.sampling.max_tokens or worst <= self.settings.max_length:
            return
        self._budget_warned = True
        log.warning(
            "sampler.max_tokens (%d) + this pair's prompt (%d tokens) = %d exceeds "
            "trainer.max_length (%d): answers that use their budget will be dropped as "
            "too_long. Raise trainer.max_length or lower sampler.max_prompt_tokens / max_tokens",
            pair.sampling.max_tokens,
            len(pair.prompt_token_ids),
            worst,
            self.settings.max_length,
        )

    def _drop(self, reason: str, pair: m.PreferencePair) -> None:
        self.dropped[reason] += 1
        self.rejected.add(pair.id)
        self.m_dropped.labels(reason).inc()
        if reason == "too_long" and self.dropped[reason] == 1:
            log.warning(
                "dropping pair %s: %d tokens (prompt + longer answer) exceed trainer.max_length "
                "(%d); the sampler's max_prompt_tokens + max_tokens should fit it (this pair "
                "was sampled with max_tokens %d). Further such drops are counted in "
                'pairs_dropped_total{reason="too_long"}',
                pair.id,
                pair_length(pair),
                self.settings.max_length,
                pair.sampling.max_tokens,
            )
        elif reason == "no_token_ids" and self.dropped[reason] == 1:
            log.warning(
                "dropping pair %s: it carries no sampled token ids (written by an older "
                "judge?), so it cannot be trained exactly as drawn; further ones are counted",
                pair.id,
            )
        log.debug("dropping %s pair %s (policy v%d)", reason, pair.id, pair.policy_version)

    def _buffer_changed(self) -> None:
        self.m_buffer.set(len(self.buffer))
        self.m_fill.set(len(self.buffer) / self.settings.round_size)

    def _on_timeout(self) -> None:
        self._timer = None
        if self.buffer:
            log.info("round timeout: training on the %d buffered pairs", len(self.buffer))
            self._schedule(force=True)

    def _schedule(self, force: bool = False, max_pairs: int | None = None) -> None:
        self._force = self._force or force
        if max_pairs is not None:
            self._force_size = max_pairs
        if self._task is None or self._task.done():
            assert self._loop is not None
            self._task = self._loop.create_task(self._run_rounds())

    async def _run_rounds(self) -> None:
        assert self._lock is not None
        async with self._lock:
            while self.buffer and (self._force or len(self.buffer) >= self.settings.round_size):
                size = self.settings.round_size
                if self._force and self._force_size:
                    size = min(size, self._force_size)
                self._force, self._force_size = False, None
                batch = self.buffer[:size]
                del self.buffer[: len(batch)]
                self._buffer_changed()
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                await self._round(batch)
            if self.buffer and self._timer is None and self._loop is not None:
                self._timer = self._loop.call_later(self.settings.round_timeout_s, self._on_timeout)

    # ------------------------------------------------------------------ one round
    async def _round(
        self,
        batch: list[tuple[m.PreferencePair, asyncio.Future[None]]],
        restore: tuple[int, int] | None = None,
    ) -> None:
        """Train ``batch`` into the next version, or with ``restore`` (restored, rejected)
        publish the next version with the restored version's weights (a rollback; the
        batch, sampled by the rejected version, is dropped)."""
        version = self.current + 1
        # Pairs buffered while the previous round trained may have gone stale since, or
        # have been sampled by a version rolled back meanwhile.
        oldest = min_version(self.current, self.settings.max_staleness)
        keep = []
        for pair, future in batch:
            reason = (
                "stale"
                if pair.policy_version < oldest
                else "rolled_back"
                if pair.policy_version in self.rejected_versions
                else None
            )
            if reason is not None:
                self._drop(reason, pair)
                self.claimed.discard(pair.id)
                future.set_result(None)
            else:
                keep.append((pair, future))
        if not keep and restore is None:
            return
        pairs = [pair for pair, _ in keep]
        if restore is None:
            restore = await self._guard()
        started = time.monotonic()
        try:
            saved = await asyncio.to_thread(self._train_and_save, version, pairs, restore)
        except Exception as exc:
            if isinstance(exc, RoundAborted):
                log.warning("round for policy-v%d stopped at shutdown; not saved", version)
            else:
                log.exception("round for policy-v%d failed; its pairs will be retried", version)
                self.m_failures.inc()
            for pair, future in keep:
                self.claimed.discard(pair.id)
                if not future.done():
                    future.set_exception(exc)
            return
        seconds = time.monotonic() - started
        if restore is not None:
            # Sampled by the rejected policy: no round of the restored one may train them.
            self.rejected_versions.add(restore[1])
            self.restores.add(version)
            for pair in pairs:
                self._drop("rolled_back", pair)
            self.m_rollbacks.inc()
        else:
            self.seen.update(p.id for p in pairs)
        self.claimed.difference_update(p.id for p in pairs)
        self.current = version
        self.latest = saved
        info = self._info(saved, published=False)
        self.rounds.append(info)
        _crash_point("after_save", version)

        await self._publish(saved)
        info.published = True
        _crash_point("after_publish", version)

        for _, future in keep:
            if not future.done():
                future.set_result(None)  # the processor may now commit these offsets
        if restore is not None:
            return
        self.m_rounds.inc()
        self.m_pairs.inc(len(pairs))
        self.m_round_s.observe(seconds)
        self.m_version.set(version)
        self.m_pairs_per_s.set(len(pairs) / seconds if seconds > 0 else 0.0)
        for name, value in info.metrics.items():
            self.m_round.labels(name).set(value)
            if name in self.m_headline:
                self.m_headline[name].set(value)

    async def _guard(self) -> tuple[int, int] | None:
        """The regression guard, before a round trains on what ``self.current`` sampled:
        ``(restored, rejected)`` versions when the evaluation rejected ``self.current``."""
        evaluation = self.settings.evaluation
        if self.evaluator is None or not evaluation.guard:
            return None
        version = self.current
        result = await asyncio.to_thread(
            self.evaluator.wait_result, version, evaluation.wait_s, self.stopping
        )
        if result is None:
            if self.evaluator.heldout_ids:
                log.warning(
                    "no held-out evaluation of policy v%d within %.0fs: training unguarded",
                    version,
                    evaluation.wait_s,
                )
            return None
        if result.verdict != REJECTED or version in self.restores:
            return None  # a restored version has the weights it was compared with: noise
        log.warning(
            "policy v%d was rejected by the guard: policy v%d gets the weights of v%d, and the "
            "pairs v%d sampled are dropped (rolled_back)",
            version,
            version + 1,
            result.best_version,
            version,
        )
        return result.best_version, version

    async def rollback(self, result: m.EvalResult) -> None:
        """Act on a rejection as soon as it is published: when ``result``'s version is still
        the current policy, publish the next version with the best version's weights now,
        instead of when a round of the rejected policy's pairs would train (a policy that
        makes no pairs at all, or too few for a round, is rolled back too)."""
        assert self._lock is not None
        async with self._lock:
            rejected = result.version
            if rejected != self.current or rejected in self.rejected_versions:
                if rejected < self.current and rejected not in self.rejected_versions:
                    log.warning(
                        "policy v%d was rejected after v%d was made from it: nothing rolled "
                        "back (the guard of v%d decides on its own evaluation)",
                        rejected,
                        self.current,
                        self.current,
                    )
                return
            if rejected in self.restores:
                # It has the weights it was compared with: the gap is sampling noise.
                log.warning(
                    "policy v%d (a restored version) scored below v%d: kept",
                    rejected,
                    result.best_version,
                )
                return
            if self.settings.max_version is not None and rejected >= self.settings.max_version:
                log.warning(
                    "policy v%d, the last version (max_version), was rejected: nothing rolled "
                    "back; serve v%d's weights to keep the better policy",
                    rejected,
                    result.best_version,
                )
                return
            log.warning(
                "policy v%d was rejected by the guard: policy v%d gets the weights of v%d now, "
                "and the pairs v%d sampled are dropped (rolled_back)",
                rejected,
                rejected + 1,
                result.best_version,
                rejected,
            )
            batch = [(p, f) for p, f in self.buffer if p.policy_version == rejected]
            self.buffer = [(p, f) for p, f in self.buffer if p.policy_version != rejected]
            self._buffer_changed()
            await self._round(batch, restore=(result.best_version, rejected))

    def rollback_threadsafe(self, result: m.EvalResult) -> Future[None] | None:
        """Schedule :meth:`rollback` on the handler loop (the evaluator's thread calls it)."""
        if self._loop is None or self._loop.is_closed():
            log.warning("policy v%d rejected before the trainer started consuming", result.version)
            return None
        return asyncio.run_coroutine_threadsafe(self.rollback(result), self._loop)

    def _policy_dir(self, version: int, out: Path) -> None:
        """Write policy ``version``'s weights to ``out``: its saved folder, or for v0 (the
        base model) a LoRA whose B matrices are zero, which is the base model exactly."""
        if version == 0:
            if self.settings.full_finetune:
                shutil.copytree(self.settings.model, out)
            else:
                zero_adapter(self.settings, out)
            return
        saved = next(r for r in self.store.rounds() if r.version == version)
        self._cache.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.store.fetch(saved, self._cache), out)

    def _train_and_save(
        self,
        version: int,
        pairs: list[m.PreferencePair],
        restore: tuple[int, int] | None = None,
    ) -> SavedRound:
        """Train ``pairs`` into policy ``version`` and save it, or with ``restore``
        (restored, rejected) save the restored version's weights as ``version`` instead."""
        rows = to_rows(pairs)
        previous = None
        if self.latest is not None and restore is None:
            self._cache.mkdir(parents=True, exist_ok=True)
            previous = self.store.fetch(self.latest, self._cache)
        with tempfile.TemporaryDirectory(prefix="onpolicy-round-") as tmp:
            extra: dict[str, Any] = {}
            if restore is None:
                result = self.train(
                    self.settings, rows, previous, Path(tmp) / "policy", should_stop=self.stopping
                )
            else:
                self._policy_dir(restore[0], Path(tmp) / "policy")
                result = RoundResult({}, Path(tmp) / "policy", 0, 0.0)
                rows = []
                extra = {"restored_version": restore[0], "rejected_version": restore[1]}
            meta = {
                **extra,
                "metrics": result.metrics,
                "num_pairs": len(rows),
                "base_model": self.settings.model,
                "full_finetune": self.settings.full_finetune,
                "previous_version": (
                    restore[0] if restore else self.latest.version if self.latest else 0
                ),
                "created_unix_ms": int(time.time() * 1000),
                "settings": self.settings.model_dump(
                    mode="json", exclude={"kafka", "topics", "log", "http"}
                ),
            }
            if self.settings.handoff == "merged" and not self.settings.full_finetune:
                merged = merge_adapter(self.settings.model, result.output_dir, Path(tmp) / "merged")
                meta["merged_uri"] = self.store.save_merged(version, merged)
            saved = self.store.save_round(version, result.output_dir, rows, meta)
            if "merged_uri" in meta:
                try:
                    self.store.prune_merged(self.settings.keep_merged)
                except OSError:  # disk housekeeping: never fail the round on it
                    log.exception("pruning old merged folders failed")
        if self.settings.hub_repo_id:
            try:
                hub.push_round(self.settings, self.store, saved)
            except Exception:  # the Hub is an extra copy: never block the loop on it
                log.exception("pushing policy-v%d to the Hub failed", version)
        return saved

    async def _publish(self, saved: SavedRound) -> None:
        """Publish the round's PolicyUpdate; retry until the broker takes it (never twice)."""
        update = policy_update(saved)
        backoff = 0.5
        while True:
            try:
                await self.producer.send_async(self.policy_topic, update)
                log.info("published policy-v%d (%s)", saved.version, saved.uri)
                return
            except KafkaError as exc:
                log.warning("publishing policy-v%d failed (%s); retrying", saved.version, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            # The send may have landed even though we saw an error: look before resending.
            try:
                versions = await asyncio.to_thread(
                    lambda: {
                        r.message.version
                        for r in read_topic(self.producer.kafka, self.policy_topic, m.PolicyUpdate)
                    }
                )
            except Exception:
                continue
            if saved.version in versions:
                return

    # ------------------------------------------------------------------ planned rounds
    def settled(self, pair_ids: set[str]) -> bool:
        """Whether every one of ``pair_ids`` has arrived: buffered, or dropped for a reason
        (the planner asks before it trains a round made of them)."""
        buffered = {pair.id for pair, _ in self.buffer}
        return pair_ids <= buffered | self.rejected

    async def train_planned(self, pair_ids: set[str]) -> None:
        """Train the round made of exactly ``pair_ids`` (all buffered), as the planner says."""
        assert self._lock is not None
        async with self._lock:
            batch = [(p, f) for p, f in self.buffer if p.id in pair_ids]
            self.buffer = [(p, f) for p, f in self.buffer if p.id not in pair_ids]
            self._buffer_changed()
            await self._round(batch)  # a failed round's pairs come back (redelivered)

    def train_planned_threadsafe(self, pair_ids: set[str]) -> Future[None]:
        """Schedule :meth:`train_planned` on the handler loop; the future says when it ended."""
        assert self._loop is not None  # pairs are buffered, so the handler loop is known
        return asyncio.run_coroutine_threadsafe(self.train_planned(set(pair_ids)), self._loop)

    # ------------------------------------------------------------------ control
    async def trigger(self, max_pairs: int | None = None) -> dict[str, Any]:
        """Run a round now with what is buffered (POST /rounds/trigger), or with the first
        ``max_pairs`` buffered pairs (the rest wait for the next round)."""
        if not self.buffer:
            return {"triggered": False, "reason": "no pairs buffered", "version": self.current}
        pairs = min(len(self.buffer), max_pairs or len(self.buffer), self.settings.round_size)
        self._schedule(force=True, max_pairs=pairs)
        return {"triggered": True, "pairs": pairs, "next_version": self.current + 1}

    def trigger_threadsafe(
        self, timeout: float = 10.0, max_pairs: int | None = None
    ) -> dict[str, Any]:
        if self._loop is None:  # no pair has been handled yet
            return {"triggered": False, "reason": "no pairs buffered", "version": self.current}
        return asyncio.run_coroutine_threadsafe(self.trigger(max_pairs), self._loop).result(timeout)

    def policy(self) -> dict[str, Any]:
        latest = self.latest
        return {
            "version": self.current,
            "base_model": self.settings.model,
            "policy_uri": latest.uri if latest and latest.version == self.current else None,
            "full_finetune": self.settings.full_finetune,
            "buffered_pairs": len(self.buffer),
            "round_size": self.settings.round_size,
            "dropped": dict(self.dropped),
        }
