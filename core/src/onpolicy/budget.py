"""The token budget that sampler and trainer must agree on.

The trainer trains each pair exactly as sampled and never cuts one, so every sequence the
sampler can produce (a prompt of up to ``sampler.max_prompt_tokens`` plus an answer of up to
``sampler.max_tokens``) must fit the trainer's ``max_length``; a pair that does not is dropped
(``too_long``). The defaults live here, beside the check, so the services' settings and the
places that start them together (``onpolicy run``, compose, the k8s manifests) agree.
"""

from __future__ import annotations

from onpolicy.settings import ConfigError

DEFAULT_MAX_PROMPT_TOKENS = 192
DEFAULT_MAX_TOKENS = 128
DEFAULT_MAX_LENGTH = DEFAULT_MAX_PROMPT_TOKENS + DEFAULT_MAX_TOKENS


def check_sequence_budget(max_prompt_tokens: int | None, max_tokens: int, max_length: int) -> None:
    """Raise :class:`ConfigError`, naming the three settings, unless they fit together."""
    if max_prompt_tokens is None:
        raise ConfigError(
            "sampler.max_prompt_tokens is unset, so a prompt of any length may be sampled; "
            f"set it so that sampler.max_prompt_tokens + sampler.max_tokens ({max_tokens}) "
            f"<= trainer.max_length ({max_length})"
        )
    if max_prompt_tokens + max_tokens > max_length:
        raise ConfigError(
            f"sampler.max_prompt_tokens ({max_prompt_tokens}) + sampler.max_tokens "
            f"({max_tokens}) = {max_prompt_tokens + max_tokens} exceeds trainer.max_length "
            f"({max_length}): long pairs would be dropped as too_long. Raise "
            "trainer.max_length or lower the sampler's budget "
            "[env ONPOLICY_TRAINER_MAX_LENGTH, ONPOLICY_SAMPLER_MAX_PROMPT_TOKENS, "
            "ONPOLICY_SAMPLER_MAX_TOKENS]"
        )
