import json

import pytest

from onpolicy.run.lineage import tagged
from onpolicy.run.prompts import PromptFileError, demo_prompts, load_prompts


def test_bad_lines_are_reported_with_their_numbers(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"text": "fine"}),
                "{not json",
                json.dumps({"text": ""}),
                json.dumps(["a list"]),
                json.dumps({"messages": [{"role": "user", "content": "ok"}], "bogus": 1}),
            ]
        )
        + "\n"
    )
    with pytest.raises(PromptFileError) as err:
        load_prompts(path)
    lines = [line for line, _ in err.value.errors]
    assert lines == [2, 3, 4, 5]
    assert "nothing published" in str(err.value)


def test_trl_style_prompt_column_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": "x"},
        {"prompt": "Plain text prompt"},
    ]
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text(json.dumps(rows[1]) + "\n")
    chat = load_prompts(tmp_path / "a.parquet").prompts[0]
    assert chat.messages[0].content == "Hi?" and chat.id.startswith("p-")
    assert load_prompts(tmp_path / "b.jsonl").prompts[0].text == "Plain text prompt"


def test_bundled_demo_prompts_are_valid_and_disjoint():
    train, held_out = demo_prompts().prompts, demo_prompts("eval").prompts
    assert len(train) == 192 and len(held_out) == 48
    assert not {p.id for p in train} & {p.id for p in held_out}


def test_tagged_prompts_get_round_specific_ids():
    prompt = demo_prompts("eval").prompts[0]
    a, b = tagged(prompt, 0, "eval"), tagged(prompt, 1, "eval", {"temperature": 0.5}, 2)
    assert a.id != b.id and b.round == 1 and b.dataset_split == "eval"
    assert b.sampling.temperature == 0.5 and b.num_samples == 2
