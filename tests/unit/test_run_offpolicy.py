"""The off-policy lineage's pair budget: as many pairs per round as the on-policy run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from onpolicy.run.runner import Runner
from onpolicy.run.settings import RunSettings
from onpolicy.settings import KafkaSettings, load_settings
from onpolicy.stack import StackSettings


class ScriptedLineage:
    """Stands in for the services of a lineage: every ``pair_every``-th training prompt
    published makes a pair (the others' samples tie), and training just records its size."""

    name = "offpolicy"

    def __init__(self, pair_every: int):
        self.pair_every = pair_every
        self.published: list = []
        self.rounds: list = []
        self.trained: list[int] = []

    def publish(self, prompts: list, kind: str = "prompts") -> None:
        self.published += prompts

    def sample_and_judge(self, record, train, published_earlier=0) -> None:
        self.publish(train)

    def wait(self, check, what: str) -> float:
        assert check(), what
        return 0.0

    def refresh(self) -> None:
        pass

    def _train(self) -> list:
        return [p for p in self.published if p.dataset_split == "train"]

    @property
    def scored(self) -> SimpleNamespace:
        groups = [SimpleNamespace(group=SimpleNamespace(prompt=p)) for p in self.published]
        return SimpleNamespace(records=groups)

    @property
    def pairs(self) -> SimpleNamespace:
        return SimpleNamespace(
            records=[SimpleNamespace(prompt=p) for p in self._train()[:: self.pair_every]]
        )

    def train(self, record) -> float:
        self.trained.append(record.pairs)
        return 0.0


@pytest.fixture
def runner(tmp_path) -> Runner:
    settings = load_settings(
        RunSettings,
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"),
        runs_dir=tmp_path / "runs",
        rounds=2,
        prompts_per_round=6,
        eval_size=2,
    )
    return Runner(
        settings, StackSettings(state_dir=tmp_path / "stack"), status=lambda *a, **k: None
    )


def test_ties_are_made_up_with_more_prompts_sampled_by_the_initial_policy(runner):
    lineage = ScriptedLineage(pair_every=2)  # the rounds' 12 prompts make 6 pairs
    runner.off_policy(lineage, [5, 6])
    assert lineage.trained == [5, 6]
    train = lineage._train()
    assert len(train) == 24 and {p.round for p in train} == {0, 1, 2, 3}
    assert len({p.id for p in train}) == 24  # fresh prompts, none sampled twice


def test_topping_up_stops_at_five_times_the_run_s_prompts(runner):
    # As many prompts as the on-policy lineage may publish (its rounds' plus four more
    # rounds' worth each): 2 rounds x 6 prompts -> at most 60, which make 10 of the 11 pairs.
    lineage = ScriptedLineage(pair_every=6)
    runner.off_policy(lineage, [5, 6])
    assert lineage.trained == [5, 5]
    assert len(lineage._train()) == 60


def test_no_top_up_when_the_rounds_prompts_suffice(runner):
    lineage = ScriptedLineage(pair_every=1)
    runner.off_policy(lineage, [5, 6])
    assert lineage.trained == [5, 6] and len(lineage._train()) == 12
