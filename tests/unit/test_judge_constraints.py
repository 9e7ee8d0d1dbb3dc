"""The instruction-following judge: each checkable constraint, parsing and pass/fail."""

from __future__ import annotations

import pytest

from onpolicy import messages as m
from onpolicy.run.prompts import load_prompts
from onpolicy.run.settings import TASKS, bundled
from onpolicy.serde import InvalidRecord
from onpolicy_judge import constraints as c
from onpolicy_judge.functions import CombinedScorer


def prompt(spec: str) -> m.Prompt:
    return m.Prompt(id="p", text="Why is the sky blue?", metadata={"constraints": spec})


def score(text: str, spec: str, finish: str = "stop", **params) -> float:
    completion = m.Completion(text=text, finish_reason=finish)
    return c.instructions(completion, prompt(spec), **params)


@pytest.mark.parametrize(
    "spec,good,bad",
    [
        ("lowercase", "the sky scatters blue light.", "The sky scatters blue light."),
        ("max_words=5", "Blue light scatters most.", "Blue light scatters the most, always."),
        ("include=light", "Sunlight? No: blue Lights scatter.", "Blue wavelengths scatter."),
        ("bullets=3", "Why:\n- one\n- two\n* three", "- one\n- two"),
        ("end_with=Hope this helps!", 'Air scatters. "Hope this helps!"', "Hope this helps! Air."),
        ("start_with=Sure", "Sure, here it is: air scatters blue.", "Surely air scatters blue."),
        ("no_commas", "Air scatters blue light.", "Air, mostly, scatters blue."),
        ("quoted", '"Air scatters blue light."', 'Air scatters "blue" light.'),
    ],
)
def test_each_constraint_passes_and_fails(spec, good, bad):
    assert score(good, spec) == 1.0
    assert score(bad, spec) == 0.0


def test_every_constraint_must_hold_and_the_answer_must_have_ended():
    spec = "lowercase;include=light"
    assert score("blue light scatters.", spec) == 1.0
    assert score("blue waves scatter.", spec) == 0.0  # one of two met
    assert score("blue waves scatter.", spec, partial=True) == 0.5
    assert score("blue light scatters", spec, finish="length") == 0.0  # cut off
    assert score("blue light scatters", spec, finish="length", require_finished=False) == 1.0


@pytest.mark.parametrize(
    "spec,reason",
    [
        ("shout", "unknown"),
        ("max_words=ten", "positive whole number"),
        ("include=", "needs an argument"),
        ("mentions=|", "needs an argument"),
        (" ; ", "names no constraint"),
    ],
)
def test_bad_specs_are_invalid_records_naming_the_problem(spec, reason):
    with pytest.raises(InvalidRecord, match=reason):
        score("anything", spec)


def test_a_prompt_without_constraints_is_an_invalid_record():
    with pytest.raises(InvalidRecord, match="metadata 'constraints'"):
        c.instructions(m.Completion(text="x", finish_reason="stop"), m.Prompt(id="p", text="q"))


def test_instructions_is_a_builtin_scorer():
    scorer = CombinedScorer.from_specs([{"name": "instructions"}])
    group = [
        m.Completion(text="blue light.", finish_reason="stop"),
        m.Completion(text="Blue light.", finish_reason="stop"),
    ]
    assert [scorer(x, prompt("lowercase")) for x in group] == [1.0, 0.0]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_bundled_tasks_are_valid_disjoint_and_checkable(task):
    train_file, eval_file, _ = TASKS[task]
    train = load_prompts(bundled(train_file)).prompts
    held_out = load_prompts(bundled(eval_file)).prompts
    assert len(train) >= 192 and len(held_out) >= 48
    text = lambda p: p.messages[0].content.split("?")[0]  # noqa: E731 - the question itself
    assert not {text(p) for p in train} & {text(p) for p in held_out}
    if task == "instructions":
        kinds = [[kind for kind, _ in c.prompt_constraints(p)] for p in train + held_out]
        formats = [p.metadata["format"] for p in train + held_out]
        assert [k[0] for k in kinds] == formats
        assert all(k[1:] in (["mentions"], ["include", "mentions"]) for k in kinds)
        # A word of the question to use keeps answers on topic; only questions of short
        # words ("What is Wi-Fi?") have none.
        assert sum(k[1:2] == ["include"] for k in kinds) >= 0.95 * len(kinds)
        # Every question has reference terms, and none of them is a word of the question
        # (else repeating the question would pass), but for a text to summarise.
        for p in train + held_out:
            question = p.messages[0].content.split("?")[0]
            terms = dict(c.prompt_constraints(p))["mentions"].split("|")
            if "summarize" not in question.casefold():
                assert not [t for t in terms if c.include(question, t)], question


def test_mentions_gates_the_score_on_the_answer_s_content():
    spec = "start_with=Sure;include=major;mentions=nile|egypt"
    assert score("Sure. The major river there is the Nile.", spec) == 1.0
    assert score("Sure, the Niles.", spec, partial=True) == 0.5  # plural, one of two formats
    assert score("Sure. A major river.", spec, partial=True) == 0.0  # formats met, no answer
    assert score("Sure.", spec, partial=True) == 0.0
    assert score("The Nile.", "mentions=nile") == 1.0  # a gate alone
    assert score("Senile.", "mentions=nile") == 0.0  # whole words only


def test_no_echo_fails_an_answer_that_repeats_the_question():
    p = m.Prompt(
        id="p",
        text='Who was Julius Caesar? Do not use any commas. Use the word "julius".',
        metadata={"constraints": "no_commas;include=julius"},
    )
    echo = m.Completion(text="Who was Julius Caesar? Do not use any commas.", finish_reason="stop")
    answer = m.Completion(text="Julius Caesar was a Roman general.", finish_reason="stop")
    assert c.instructions(echo, p) == 1.0  # off by default: the measured demo ran without it
    assert c.instructions(echo, p, no_echo=True) == 0.0
    assert c.instructions(answer, p, no_echo=True) == 1.0
