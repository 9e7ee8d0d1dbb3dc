"""The end-to-end tests run the loop in handoff=lora: they check adapter names in vLLM's
/v1/models and in the groups. The merged hand-off is tested on the same server in
tests/integration/test_handoff.py and measured by `python -m benchmarks handoff`."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package", autouse=True)
def _lora_handoff():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONPOLICY_HANDOFF", "lora")
        yield
