"""The prompt as chat turns, the way the sampler sent it to the policy."""

from __future__ import annotations

from onpolicy import messages as m


def prompt_messages(prompt: m.Prompt) -> list[dict[str, str]]:
    """OpenAI-style turns: the system prompt (if any), then the chat turns or the raw text."""
    turns: list[dict[str, str]] = []
    if prompt.HasField("system_prompt") and prompt.system_prompt:
        turns.append({"role": "system", "content": prompt.system_prompt})
    if prompt.messages:
        turns.extend({"role": t.role, "content": t.content} for t in prompt.messages)
    else:
        turns.append({"role": "user", "content": prompt.text})
    return turns


def instruction_text(prompt: m.Prompt) -> str:
    """The prompt as plain text for a judge's template (multi-turn chats keep their roles)."""
    turns = prompt_messages(prompt)
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n\n".join(f"[{t['role']}]\n{t['content']}" for t in turns)
