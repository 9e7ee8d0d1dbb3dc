"""The prompt as chat turns, the way the sampler sent it to the policy."""

from __future__ import annotations

from onpolicy import messages as m

# Kept under this name for the judge's modules; the one implementation lives in the core.
prompt_messages = m.chat_turns


def instruction_text(prompt: m.Prompt) -> str:
    """The prompt as plain text for a judge's template (multi-turn chats keep their roles)."""
    turns = prompt_messages(prompt)
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n\n".join(f"[{t['role']}]\n{t['content']}" for t in turns)
