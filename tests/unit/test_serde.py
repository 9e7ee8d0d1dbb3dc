import json

import pytest
from google.protobuf import json_format

from onpolicy import messages as m
from onpolicy.serde import CONTENT_TYPE, DecodeError, decode, encode


def sample_messages():
    prompt = m.Prompt(
        id="p1", messages=[m.ChatMessage(role="user", content="Hi")], metadata={"src": "unit"}
    )
    prompt.sampling.temperature = 0.7
    group = m.CompletionGroup(
        id="g1",
        prompt_id="p1",
        prompt=prompt,
        policy_version=3,
        model="base",
        completions=[
            m.Completion(index=0, text="a", num_tokens=1, finish_reason="stop"),
            m.Completion(index=1, text="bb", num_tokens=2, finish_reason="length"),
        ],
    )
    scored = m.ScoredGroup(id="s1", group=group, scores=[1.0, 0.5], judge_id="len")
    pair = m.PreferencePair(
        id="x", prompt_id="p1", chosen="a", rejected="bb", margin=0.5, policy_version=3
    )
    update = m.PolicyUpdate(id="policy-v1", version=1, adapter_uri="/tmp/a", base_model="b")
    update.metrics.update({"loss": 0.5})
    letter = m.DeadLetter(id="d", source_topic="t", offset=4, original_value=b"\x00\xff")
    return [prompt, group, scored, pair, update, letter]


@pytest.mark.parametrize("fmt", ["protobuf", "json"])
@pytest.mark.parametrize("message", sample_messages(), ids=lambda x: type(x).__name__)
def test_round_trip(message, fmt):
    value, headers = encode(message, fmt)
    assert dict(headers)["message-type"] == message.DESCRIPTOR.full_name.encode()
    assert decode(type(message), value, headers) == message


def test_json_without_headers_is_accepted():
    value = json.dumps({"text": "Say hi", "numSamples": 4}).encode()
    prompt = decode(m.Prompt, value, [])
    assert prompt.text == "Say hi" and prompt.num_samples == 4


def test_plain_json_object_with_json_content_type():
    value = b'{"messages": [{"role": "user", "content": "x"}]}'
    prompt = decode(m.Prompt, value, [(CONTENT_TYPE, b"application/json")])
    assert prompt.messages[0].content == "x"


@pytest.mark.parametrize(
    ("value", "headers", "reason"),
    [
        (b"not json", [], "not a JSON object"),
        (b"{broken", [], "invalid JSON"),
        (b"[1, 2]", [(CONTENT_TYPE, b"application/json")], "must be an object"),
        (b'{"nope": 1}', [], "invalid JSON"),
        (b"\xff\xfe", [(CONTENT_TYPE, b"application/x-protobuf")], "invalid protobuf"),
        (b"{}", [(CONTENT_TYPE, b"text/csv")], "unsupported content-type"),
        (b"{}", [("schema-version", b"2")], "schema-version"),
        (b"{}", [("message-type", b"onpolicy.v1.PolicyUpdate")], "message-type"),
        (None, [], "tombstone"),
    ],
)
def test_undecodable_records_say_why(value, headers, reason):
    with pytest.raises(DecodeError, match=reason):
        decode(m.Prompt, value, headers)


def test_json_encoding_is_canonical_protobuf_json():
    prompt = m.Prompt(text="x", num_samples=2)
    value, _ = encode(prompt, "json")
    assert json.loads(value) == json_format.MessageToDict(prompt)
