"""Pieces of the DPO round that need no training: rows as sampled ids, and round metrics."""

from __future__ import annotations

from types import SimpleNamespace

from onpolicy import messages as m
from onpolicy_trainer.dpo import _round_metrics
from onpolicy_trainer.pairs import admit, sequence_length, to_row


def _pair(prompt_ids, chosen_ids, rejected_ids, version=3) -> m.PreferencePair:
    return m.PreferencePair(
        id="p",
        prompt_id="q",
        prompt=m.Prompt(id="q", messages=[m.ChatMessage(role="user", content="hi")]),
        chosen="a",
        rejected="b",
        policy_version=version,
        prompt_token_ids=prompt_ids,
        chosen_token_ids=chosen_ids,
        rejected_token_ids=rejected_ids,
        chosen_finish_reason="stop",
        rejected_finish_reason="length",
    )


def test_rows_are_the_sampled_ids_as_drawn():
    row = to_row(_pair([1, 2, 3], [7, 8, 2], [9, 9, 9, 9]))
    assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (
        [1, 2, 3],
        [7, 8, 2],  # ended on EOS (id 2): kept
        [9, 9, 9, 9],  # cut off: no EOS added
    )
    assert sequence_length(row) == 7
    assert row["prompt"] == [{"role": "user", "content": "hi"}]
    assert (row["chosen_finish_reason"], row["rejected_finish_reason"]) == ("stop", "length")


def test_too_long_and_id_less_pairs_are_dropped_not_cut():
    fits = _pair([1] * 10, [2] * 5, [3] * 6)
    assert admit(fits, 3, 0, set(), max_length=16) == "ok"
    assert admit(fits, 3, 0, set(), max_length=15) == "too_long"
    assert admit(_pair([], [2], [3]), 3, 0, set(), max_length=16) == "no_token_ids"
    assert admit(fits, 4, 0, set(), max_length=16) == "stale"  # staleness is checked first


def test_round_metrics_average_logged_steps_and_keep_the_last():
    history = [
        {"loss": 0.69, "rewards/margins": 0.0, "rewards/accuracies": 0.0},
        {"loss": 0.5, "rewards/margins": 1.0, "rewards/accuracies": 1.0},
        {"train_loss": 0.6, "train_runtime": 3.0},
    ]
    metrics = _round_metrics(history, train_loss=0.6)
    assert metrics["loss"] == 0.6 and metrics["steps"] == 2
    assert metrics["rewards/margins"] == 0.5 and metrics["last/rewards/margins"] == 1.0
    assert metrics["rewards/accuracies"] == 0.5
    assert "rewards/chosen" not in metrics  # absent from the log, absent from the result


def test_a_sampler_budget_over_max_length_is_said_once_naming_both_settings(caplog):
    from onpolicy_trainer.rounds import RoundRunner
    from onpolicy_trainer.settings import TrainerSettings

    runner = RoundRunner.__new__(RoundRunner)
    runner.settings = TrainerSettings(model="m", max_length=16)
    runner._budget_warned = False
    fits = _pair([1] * 4, [2], [3])
    fits.sampling.max_tokens = 12
    runner._check_budget(fits)
    assert not caplog.records  # 4 + 12 fits 16
    over = _pair([1] * 8, [2], [3])
    over.sampling.max_tokens = 12
    runner._check_budget(over)
    runner._check_budget(over)
    [record] = caplog.records
    assert "sampler.max_tokens (12)" in record.message
    assert "trainer.max_length (16)" in record.message


def test_at_stop_buffered_pairs_are_let_go_and_their_handlers_end_unfinished(tmp_path):
    """``release_waiting`` (the processor's on_stop): pairs waiting for a round are let go
    at once, their handlers end cancelled (so their offsets stay uncommitted), and no round
    is started from them."""
    import asyncio
    import threading

    from onpolicy.telemetry import Metrics
    from onpolicy_trainer.rounds import RoundRunner
    from onpolicy_trainer.settings import TrainerSettings

    settings = TrainerSettings(
        model="m", checkpoint_uri=str(tmp_path), round_size=4, round_protocol=False
    )
    runner = RoundRunner(settings, Metrics("trainer_stop_test"), producer=None)
    trained = []
    runner.train = lambda *a, **k: trained.append(a)

    async def main():
        runner.bind(asyncio.get_running_loop())
        pairs = [_pair([1, 2], [3, 2], [4], version=0) for _ in range(2)]
        for i, pair in enumerate(pairs):
            pair.id = f"pair-{i}"
        handlers = [asyncio.ensure_future(runner.handle(SimpleNamespace(message=p))) for p in pairs]
        await asyncio.sleep(0.05)
        assert len(runner.buffer) == 2 and runner.claimed == {"pair-0", "pair-1"}
        # Called from the processor's polling thread, as at a stop.
        threading.Thread(target=runner.release_waiting).start()
        results = await asyncio.wait_for(
            asyncio.gather(*handlers, return_exceptions=True), timeout=5
        )
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results
        assert runner.buffer == [] and runner.claimed == set() and runner._timer is None

    asyncio.run(main())
    assert trained == []  # no round from the let-go pairs
