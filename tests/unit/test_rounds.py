"""The round protocol's pure parts: the plan book (fence, covering) and the planner's picks."""

from __future__ import annotations

from types import SimpleNamespace

from onpolicy import messages as m
from onpolicy.rounds import RoundBook
from onpolicy_trainer.planner import RoundPlanner, _Prompt
from onpolicy_trainer.settings import TrainerSettings


def plan(round_: int, seq: int, *ranges: tuple[int, int, int], version: int = 0) -> m.RoundPlan:
    return m.validate(
        m.RoundPlan(
            round=round_,
            seq=seq,
            sample_version=version,
            ranges=[m.OffsetRange(partition=p, start=a, end=b) for p, a, b in ranges],
        )
    )


def test_fence_is_the_newest_plans_end_and_extensions_replace_older_seqs():
    book = RoundBook()
    assert book.fence(0) == 0  # nothing planned: nothing may be sampled
    assert book.add(plan(1, 0, (0, 0, 3), (1, 0, 2)))
    assert (book.fence(0), book.fence(1)) == (3, 2)
    assert not book.add(plan(1, 0, (0, 0, 1)))  # a replay of an older seq changes nothing
    assert book.add(plan(1, 1, (0, 0, 5), (1, 0, 2)))
    assert book.fence(0) == 5
    assert book.add(plan(2, 0, (0, 5, 7), (1, 2, 4), version=1))
    assert (book.fence(0), book.fence(1)) == (7, 4)
    assert book.covering(0, 4).round == 1 and book.covering(0, 5).round == 2
    assert book.covering(1, 4) is None and book.covering(0, 7) is None
    assert book.latest().round == 2 and book.get(2).id == "round-2-0"


class _View:
    """The planner's Kafka view, built by hand: prompts per (partition, offset)."""

    def __init__(self, layout: dict[int, str]):
        # layout: partition -> a string, one char per record: t train, e eval, x invalid,
        # d a duplicate of an earlier train prompt.
        self.prompts = {}
        self.high, self.low = {}, {}
        self.groups, self.dead_offsets, self.dead_prompt_ids = {}, set(), set()
        for p, kinds in layout.items():
            self.low[p], self.high[p] = 0, len(kinds)
            for o, k in enumerate(kinds):
                pid = None if k == "x" else f"p{p}-{o}"
                self.prompts[(p, o)] = _Prompt(pid, k in "td", k != "d")


def planner(view: _View, round_size: int = 4, current: int = 0) -> RoundPlanner:
    p = RoundPlanner.__new__(RoundPlanner)
    p.settings = TrainerSettings(model="m", round_size=round_size)
    p.runner = SimpleNamespace(current=current, rejected_versions=set())
    p.book = RoundBook()
    p.view = view  # type: ignore[assignment]
    return p


def test_next_prompts_takes_training_prompts_across_partitions_in_turn():
    view = _View({0: "tetttt", 1: "txtt"})
    p = planner(view)
    # p0: t(0) e(1) t(2); p1: t(0) x(1) t(2): four training prompts, in turn.
    assert p._next_prompts({0: 0, 1: 0}, 4) == {0: 3, 1: 3}
    assert p._next_prompts({0: 0, 1: 0}, 100) == {0: 6, 1: 4}  # all there is
    assert p._next_prompts({0: 6, 1: 4}, 2) == {0: 6, 1: 4}  # nothing more published


def test_status_counts_done_prompts_and_their_pairs():
    view = _View({0: "ttd", 1: "tx"})
    p = planner(view)
    pl = plan(1, 0, (0, 0, 3), (1, 0, 2), version=0)
    status = p.status(pl)
    assert (status.train_prompts, status.done_train, status.pending) == (4, 1, 4)
    # The duplicate (0, 2) is done at once; the others wait for their groups.
    view.groups["p0-0"] = [(0, "", ["pair-a"])]
    view.groups["p0-1"] = [(0, "", [])]  # judged, every candidate dropped: done, no pair
    view.groups["p1-0"] = [(-1, "", ["old"])]  # sampled by an older policy: not this round's
    view.dead_offsets.add((1, 1))  # the invalid record was dead-lettered
    status = p.status(pl)
    assert (status.done_train, status.pending) == (3, 1)
    assert status.pair_ids == {"pair-a"} and not status.complete
    view.groups["p1-0"].append((0, "", ["pair-b"]))
    status = p.status(pl)
    assert status.complete and status.pair_ids == {"pair-a", "pair-b"}


def test_a_group_the_judge_dead_lettered_marks_its_prompt_done_whatever_its_encoding():
    """The judge dead-letters a completions record (e.g. an invalid regex reference): the
    planner reads the group back from the dead letter with the group's own headers, so the
    prompt counts as done and the round does not wait for it forever."""
    from onpolicy.serde import encode
    from onpolicy.settings import TopicSettings
    from onpolicy_trainer.planner import KafkaView

    topics = TopicSettings(prefix="t.")
    view = KafkaView.__new__(KafkaView)
    view.topics, view.dead_offsets, view.dead_prompt_ids = topics, set(), set()
    for wire in ("protobuf", "json"):
        group = m.CompletionGroup(id=f"g-{wire}", prompt_id=f"p-{wire}")
        value, headers = encode(group, wire)
        letter = m.DeadLetter(
            source_topic=topics.name("completions"),
            original_value=value,
            original_headers={k: v.decode() for k, v in headers},
        )
        letter_value, letter_headers = encode(letter)
        raw = SimpleNamespace(value=letter_value, headers=letter_headers, offset=0)
        view._take(SimpleNamespace(topic=topics.name("dlq"), partition=0), raw)
    assert view.dead_prompt_ids == {"p-protobuf", "p-json"}
