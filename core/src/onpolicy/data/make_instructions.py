"""Writes the instruction-following demo prompts from the bundled questions (run it to regenerate).

Each question of ``demo_prompts.jsonl`` (training) and ``demo_eval_prompts.jsonl`` (held out,
disjoint) gets one format constraint, in turn, plus ``include`` of a content word of the
question itself (the longest word that is not a stop word), which keeps answers on topic,
and ``mentions`` of the question's reference terms (``metadata.mentions`` of the plain
questions, ``|``-separated: words a right answer uses that the question does not), which the
judge requires.
``python -m onpolicy.data.make_instructions`` rewrites ``instructions_*.jsonl`` beside it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).parent

# (constraint spec, the sentence added to the question)
FORMATS = [
    ("lowercase", "Write your whole answer in lowercase letters, with no capital letters."),
    ("max_words=20", "Answer in at most 20 words."),
    ("no_commas", "Do not use any commas in your answer."),
    ("start_with=Sure", 'Begin your answer with the word "Sure".'),
    ("end_with=Hope this helps!", 'End your answer with the exact words "Hope this helps!"'),
]

STOP = set(
    [
        "about",
        "above",
        "after",
        "again",
        "against",
        "also",
        "among",
        "another",
        "answer",
        "because",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "cannot",
        "could",
        "does",
        "doing",
        "down",
        "during",
        "each",
        "explain",
        "from",
        "further",
        "have",
        "having",
        "here",
        "into",
        "itself",
        "just",
        "more",
        "most",
        "much",
        "name",
        "other",
        "over",
        "same",
        "should",
        "some",
        "such",
        "than",
        "that",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "thing",
        "things",
        "this",
        "those",
        "three",
        "through",
        "under",
        "until",
        "usually",
        "very",
        "what",
        "when",
        "where",
        "which",
        "while",
        "whom",
        "whose",
        "will",
        "with",
        "would",
        "your",
        "yours",
        "sentence",
        "summarize",
        "difference",
        "give",
        "example",
        "tell",
        "list",
        "makes",
        "make",
        "mean",
        "means",
        "does",
        "people",
        "good",
        "one",
        "what's",
        "different",
    ]
)


def keyword(question: str) -> str:
    words = [w for w in re.findall(r"[A-Za-z]+", question) if len(w) >= 4]
    words = [w for w in words if w.casefold() not in STOP]
    return max(words, key=len).casefold() if words else ""


def build(source: str, target: str, formats: list[tuple[str, str]]) -> int:
    rows = [json.loads(line) for line in (HERE / source).read_text().splitlines() if line.strip()]
    out = []
    for i, row in enumerate(rows):
        question = row["messages"][0]["content"]
        spec, sentence = formats[i % len(formats)]
        word = keyword(question)
        specs = [spec] + ([f"include={word}"] if word else [])
        if terms := row["metadata"].get("mentions"):
            specs.append(f"mentions={terms}")
        text = f"{question} {sentence}" + (f' Use the word "{word}".' if word else "")
        out.append(
            {
                "messages": [{"role": "user", "content": text}],
                "metadata": {
                    "topic": row["metadata"].get("topic", ""),
                    "constraints": ";".join(specs),
                    "format": spec.partition("=")[0],
                },
            }
        )
    (HERE / target).write_text("".join(json.dumps(r) + "\n" for r in out))
    return len(out)


if __name__ == "__main__":
    print(build("demo_prompts.jsonl", "instructions_prompts.jsonl", FORMATS))
    print(build("demo_eval_prompts.jsonl", "instructions_eval_prompts.jsonl", FORMATS))
