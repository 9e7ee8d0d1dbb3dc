import pytest

from onpolicy import ids
from onpolicy import messages as m
from onpolicy.serde import InvalidRecord


def test_prompt_id_is_filled_deterministically_from_content():
    a = m.validate(m.Prompt(text="Tell me a joke"))
    b = m.validate(m.Prompt(text="Tell me a joke"))
    c = m.validate(m.Prompt(text="Tell me a joke", round=1))
    assert a.id == b.id and a.id.startswith("p-")
    assert c.id != a.id


def test_explicit_prompt_id_is_kept():
    assert m.validate(m.Prompt(id="mine", text="x")).id == "mine"


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        (m.Prompt(), "empty"),
        (m.Prompt(text="   "), "empty"),
        (m.Prompt(text="x", messages=[m.ChatMessage(role="user", content="y")]), "both"),
        (m.Prompt(messages=[m.ChatMessage(role="robot", content="y")]), "role"),
        (m.Prompt(messages=[m.ChatMessage(role="user", content="")]), "content is empty"),
        (m.Prompt(text="x", num_samples=0), "num_samples"),
        (m.Prompt(text="x", sampling=m.SamplingParams(top_p=0)), "top_p"),
        (m.Prompt(text="x", sampling=m.SamplingParams(max_tokens=0)), "max_tokens"),
    ],
)
def test_invalid_prompts_are_rejected_with_reason(prompt, reason):
    with pytest.raises(InvalidRecord, match=reason):
        m.validate(prompt)


def test_ids_are_stable_and_distinct():
    assert ids.pair_id("p", 1, 0, 3, "j") == ids.pair_id("p", 1, 0, 3, "j")
    assert ids.pair_id("p", 1, 0, 3, "j") != ids.pair_id("p", 2, 0, 3, "j")
    assert ids.group_id("p", 0) != ids.group_id("p", 1)
    # Concatenation ambiguity must not collide.
    assert ids.digest("ab", "c", prefix="x") != ids.digest("a", "bc", prefix="x")
    assert ids.policy_id(7) == "policy-v7"


def test_group_scored_pair_policy_ids():
    group = m.validate(
        m.CompletionGroup(prompt_id="p", policy_version=2, completions=[m.Completion(text="a")])
    )
    assert group.id == ids.group_id("p", 2)
    scored = m.validate(m.ScoredGroup(group=group, scores=[1.0], judge_id="j"))
    assert scored.id == ids.scored_id(group.id, "j")
    with pytest.raises(InvalidRecord, match="1 completions"):
        m.validate(m.ScoredGroup(group=group, scores=[1.0, 2.0]))
    with pytest.raises(InvalidRecord, match="same text"):
        m.validate(m.PreferencePair(chosen="a", rejected="a"))
    update = m.validate(m.PolicyUpdate(version=3, adapter_uri="/x"))
    assert update.id == "policy-v3"
    with pytest.raises(InvalidRecord, match="neither"):
        m.validate(m.PolicyUpdate(version=3))


def test_model_input_is_what_the_policy_sees():
    chat = m.Prompt(messages=[m.ChatMessage(role="user", content="Hi")], system_prompt="Be brief.")
    assert m.model_input(chat) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    own = m.Prompt(
        messages=[
            m.ChatMessage(role="system", content="Mine."),
            m.ChatMessage(role="user", content="Hi"),
        ],
        system_prompt="Be brief.",
    )
    assert [t["content"] for t in m.model_input(own)] == ["Mine.", "Hi"]  # no second system
    text = m.Prompt(text="Once upon", system_prompt="Story:")
    assert m.model_input(text) == "Story:\n\nOnce upon"
    assert m.model_input(m.Prompt(text="Once upon")) == "Once upon"
    # Judges need a conversation: raw text becomes one user turn after the system prompt.
    assert m.chat_turns(text) == [
        {"role": "system", "content": "Story:"},
        {"role": "user", "content": "Once upon"},
    ]
    assert m.chat_turns(own) == m.model_input(own)
