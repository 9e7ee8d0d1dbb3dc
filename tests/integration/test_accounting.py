"""The audit's fates against the real broker: a prompt whose group the judge dead-lettered
is dropped with a reason, not lost."""

from __future__ import annotations

from onpolicy import ids
from onpolicy import messages as m
from onpolicy.bus import Producer
from onpolicy.run.accounting import audit


def test_a_prompt_whose_group_the_judge_dead_lettered_is_dropped_not_lost(kafka, topics, tmp_path):
    producer = Producer(kafka)
    fates = {}
    for name in ("judged-dead", "never-judged"):
        prompt = m.validate(m.Prompt(text=f"{name}?", dataset_split="train"))
        meta = producer.send_sync(topics.name("prompts"), prompt)
        group = m.CompletionGroup(
            id=ids.group_id(prompt.id, 0),
            prompt_id=prompt.id,
            prompt=prompt,
            completions=[m.Completion(index=0, text="a", finish_reason="stop")],
            source=m.PromptSource(
                topic=topics.name("prompts"), partition=meta.partition, offset=meta.offset
            ),
        )
        producer.send_sync(topics.name("completions"), group)
        fates[name] = (meta.partition, meta.offset)
        if name == "judged-dead":
            letter = m.DeadLetter(
                id=ids.dead_letter_id(topics.name("completions"), 0, 0),
                source_topic=topics.name("completions"),
                error_kind="invalid",
                error_message="regex scorer: pattern not supported by RE2",
                original_value=group.SerializeToString(),
            )
            producer.send_sync(topics.name("dlq"), letter)
    producer.close()
    # Nothing trained yet (no saved round): a sampled, unjudged prompt of no open plan is lost.
    result = audit(kafka, topics, tmp_path / "checkpoints")
    assert result.published_prompts == 2
    assert result.fates["dropped"] == 1, result.as_dict()
    assert result.lost == [fates["never-judged"]]
