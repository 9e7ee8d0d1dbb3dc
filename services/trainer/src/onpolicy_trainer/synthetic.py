"""Synthetic preference pairs for smoke runs, tests and the benchmark.

They mimic what the judge produces for SmolLM2: the chosen answer is short and to the point,
the rejected one rambles and repeats itself (the model's own failure mode), so one DPO round
has a clear, learnable signal.
"""

from __future__ import annotations

from typing import Any

from onpolicy import messages as m

FACTS = (
    ("What is the capital of France?", "Paris."),
    ("How many legs does a spider have?", "Eight."),
    ("What colour is the sky on a clear day?", "Blue."),
    ("What is 7 times 6?", "42."),
    ("Which planet is known as the Red Planet?", "Mars."),
    ("What gas do plants take in from the air?", "Carbon dioxide."),
    ("What is the boiling point of water at sea level in Celsius?", "100 degrees Celsius."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean."),
    ("How many days are in a leap year?", "366."),
    ("What is the chemical symbol for gold?", "Au."),
    ("What is the opposite of hot?", "Cold."),
    ("How many continents are there?", "Seven."),
    ("What do bees make?", "Honey."),
    ("What is the freezing point of water in Celsius?", "0 degrees Celsius."),
    ("What is the square root of 81?", "9."),
)


def rambling(question: str, answer: str, repeats: int = 3) -> str:
    core = answer.rstrip(".")
    sentence = f"The answer to the question '{question}' is {core}. "
    filler = (
        "This is a very interesting question that many people ask, and it is important to "
        "think about it carefully before answering. "
    )
    return (filler + sentence) * repeats + f"So, to sum up, the answer is {core}, {core}, {core}."


def sampled_ids(tokenizer: Any, prompt: m.Prompt, answer: str) -> tuple[list[int], list[int]]:
    """The ids vLLM would return had the model sampled ``answer`` and ended it: the prompt
    under the chat template with the generation prompt, the answer, then EOS."""
    encoded = tokenizer.apply_chat_template(
        m.model_input(prompt), tokenize=True, add_generation_prompt=True
    )
    prompt_ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return prompt_ids, [*answer_ids, tokenizer.eos_token_id]


def make_pairs(
    n: int,
    policy_version: int = 0,
    judge_id: str = "synthetic",
    round_: int = 0,
    tokenizer: Any = None,
) -> list[m.PreferencePair]:
    """``n`` validated pairs (ids filled); prompts cycle through ``FACTS``.

    With a ``tokenizer`` (the base model's) the pairs carry sampled token ids as the sampler
    would record them, so the trainer can train them; without one they carry text only.
    """
    pairs = []
    for i in range(n):
        question, answer = FACTS[i % len(FACTS)]
        prompt = m.validate(
            m.Prompt(
                messages=[m.ChatMessage(role="user", content=question)],
                metadata={"n": str(i)},
                round=round_ + i // len(FACTS),  # distinct prompt ids when cycling
            )
        )
        pair = m.PreferencePair(
            prompt_id=prompt.id,
            prompt=prompt,
            chosen=answer,
            rejected=rambling(question, answer, repeats=1 + i % 2),
            chosen_score=1.0,
            rejected_score=0.2,
            margin=0.8,
            judge_id=judge_id,
            policy_version=policy_version,
            chosen_index=0,
            rejected_index=1,
            chosen_finish_reason="stop",
            rejected_finish_reason="stop",
        )
        if tokenizer is not None:
            prompt_ids, chosen_ids = sampled_ids(tokenizer, prompt, pair.chosen)
            pair.prompt_token_ids[:] = prompt_ids
            pair.chosen_token_ids[:] = chosen_ids
            pair.rejected_token_ids[:] = sampled_ids(tokenizer, prompt, pair.rejected)[1]
        pairs.append(m.validate(pair))
    return pairs
