"""``hub.push_round`` against huggingface_hub's real client, the Hub stubbed at HTTP only.

The Hub is a remote API this suite cannot reach, so the one thing replaced is the transport:
huggingface_hub's own ``set_client_factory`` is given a client whose ``MockTransport`` plays
the endpoints ``HfApi.create_repo`` and ``HfApi.create_commit`` call. Everything above it
(request building, preupload negotiation, the NDJSON commit payload, error mapping) is the
library's real code, and the round comes from the trainer's real ``CheckpointStore``.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import _http

from onpolicy.settings import load_settings
from onpolicy_trainer import hub
from onpolicy_trainer.pairs import to_rows
from onpolicy_trainer.settings import TrainerSettings
from onpolicy_trainer.store import CheckpointStore, SavedRound
from onpolicy_trainer.synthetic import make_pairs

# huggingface_hub 2.x sends through httpx2 (an httpx fork with the same API), 1.x through
# httpx: use whichever module the installed version builds its clients with.
httpx: Any = getattr(_http, "httpx2", None) or _http.httpx

HOST = "hub.test"
ENDPOINT = f"https://{HOST}"
TOKEN = "hf_dummy_token"
REPO = "someone/onpolicy-policies"
COMMIT_OID = "c0ffee" + "0" * 34


@dataclass
class FakeHub:
    """Records every request; answers what a healthy Hub answers, or ``status`` to all.

    The transport is process-wide, so it also sees requests huggingface_hub makes on its own
    to ``constants.ENDPOINT`` (2.x looks up ``/api/agent-harnesses`` once per process to fill
    its user-agent, whatever ``HfApi(endpoint=...)`` says). Those get a 404, which the library
    shrugs off (and so caches nothing under ``HF_HOME``); only ``hub.test`` plays the Hub.
    """

    status: int | None = None
    requests: list[Any] = field(default_factory=list)

    def __call__(self, request: Any) -> Any:
        request.read()
        self.requests.append(request)
        if request.url.host != HOST:
            return httpx.Response(404, json={"error": "not the Hub under test"})
        if self.status is not None:
            return httpx.Response(
                self.status,
                json={"error": "Invalid credentials in Authorization header"},
                headers={"X-Error-Message": "Invalid credentials in Authorization header"},
            )
        method, path = request.method, request.url.path
        if (method, path) == ("POST", "/api/repos/create"):
            return httpx.Response(200, json={"url": f"{ENDPOINT}/{REPO}", "name": REPO})
        if (method, path) == ("POST", f"/api/models/{REPO}/preupload/main"):
            files = json.loads(request.content)["files"]
            # "regular" for every file: its bytes travel inside the commit (no LFS, no Xet).
            return httpx.Response(
                200,
                json={
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in files
                    ]
                },
            )
        if (method, path) == ("POST", f"/api/models/{REPO}/commit/main"):
            return httpx.Response(
                200,
                json={
                    "success": True,
                    "commitOid": COMMIT_OID,
                    "commitUrl": f"{ENDPOINT}/{REPO}/commit/{COMMIT_OID}",
                },
            )
        return httpx.Response(404, json={"error": f"no fake for {method} {path}"})

    @property
    def hub_requests(self) -> list[Any]:
        return [r for r in self.requests if r.url.host == HOST]

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.url.path) for r in self.hub_requests]


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """Route huggingface_hub's shared HTTP client to a FakeHub; restore the factory after."""
    fake = FakeHub()
    # HF_HUB_OFFLINE=1 in the environment would make the request hook refuse every call.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    previous = _http._GLOBAL_CLIENT_FACTORY
    huggingface_hub.set_client_factory(
        lambda: httpx.Client(  # as default_client_factory, with the transport swapped
            transport=httpx.MockTransport(fake),
            event_hooks={"request": [_http.hf_request_event_hook]},
            follow_redirects=True,
        )
    )
    try:
        yield fake
    finally:
        huggingface_hub.set_client_factory(previous)  # also closes the fake's client


def safetensors_bytes() -> bytes:
    """A tiny but valid safetensors file: one 2x2 float32 tensor (binary, not UTF-8)."""
    header = json.dumps(
        {"lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    ).encode()
    return struct.pack("<Q", len(header)) + header + struct.pack("<4f", 0.5, -1.0, 2.0, 1e-3)


@pytest.fixture
def saved_round(tmp_path: Path) -> tuple[CheckpointStore, SavedRound]:
    """Round 1 saved by the trainer's store: a PEFT-like adapter folder and its dataset."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (adapter / "adapter_model.safetensors").write_bytes(safetensors_bytes())
    store = CheckpointStore(str(tmp_path / "ckpt"))
    saved = store.save_round(1, adapter, to_rows(make_pairs(3)), {"num_pairs": 3})
    return store, saved


def settings(tmp_path: Path, private: bool) -> TrainerSettings:
    return load_settings(
        TrainerSettings,
        checkpoint_uri=str(tmp_path / "ckpt"),
        hub_repo_id=REPO,
        hub_private=private,
    )


def committed_files(commit: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The NDJSON commit payload: its header and the decoded bytes of each regular file."""
    assert commit.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in commit.content.decode().splitlines()]
    header, *ops = lines
    assert header["key"] == "header"
    assert {op["key"] for op in ops} == {"file"}  # no lfsFile, deletions or copies
    assert all(op["value"]["encoding"] == "base64" for op in ops)
    return header["value"], {
        op["value"]["path"]: base64.b64decode(op["value"]["content"]) for op in ops
    }


# huggingface_hub warns whenever a .parquet goes to a model repo; push_round does so on purpose.
@pytest.mark.filterwarnings("ignore:It seems that you are about to commit a data file")
@pytest.mark.parametrize("private", [True, False], ids=["private", "public"])
def test_push_round_creates_the_repo_and_commits_policy_and_dataset_once(
    tmp_path: Path,
    fake_hub: FakeHub,
    saved_round: tuple[CheckpointStore, SavedRound],
    private: bool,
) -> None:
    store, saved = saved_round
    hub.push_round(
        settings(tmp_path, private), store, saved, api=HfApi(endpoint=ENDPOINT, token=TOKEN)
    )

    assert fake_hub.calls() == [
        ("POST", "/api/repos/create"),
        ("POST", f"/api/models/{REPO}/preupload/main"),
        ("POST", f"/api/models/{REPO}/commit/main"),
    ]
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in fake_hub.hub_requests)
    assert all(r.method == "GET" for r in fake_hub.requests if r.url.host != HOST)  # no upload

    create, preupload, commit = fake_hub.hub_requests
    assert json.loads(create.content) == {
        "name": "onpolicy-policies",
        "organization": "someone",
        "visibility": "private" if private else "public",
    }

    dataset = f"datasets/{store.dataset_name(1)}"
    expected = {
        "policy-v1/adapter_config.json": Path(store.path("policy-v1", "adapter_config.json")),
        "policy-v1/adapter_model.safetensors": Path(
            store.path("policy-v1", "adapter_model.safetensors")
        ),
        "policy-v1/round.json": Path(store.path("policy-v1", "round.json")),  # the marker too
        dataset: Path(store.path("datasets", store.dataset_name(1))),
    }
    announced = json.loads(preupload.content)["files"]
    assert {f["path"]: f["size"] for f in announced} == {
        name: path.stat().st_size for name, path in expected.items()
    }

    header, files = committed_files(commit)
    assert header["summary"] == "policy-v1"
    assert files == {name: path.read_bytes() for name, path in expected.items()}
    assert files["policy-v1/adapter_model.safetensors"] == safetensors_bytes()
    assert files[dataset][:4] == b"PAR1"  # the store's Parquet, byte for byte


def test_push_round_raises_the_hub_http_error_when_unauthorized(
    tmp_path: Path, fake_hub: FakeHub, saved_round: tuple[CheckpointStore, SavedRound]
) -> None:
    store, saved = saved_round
    fake_hub.status = 401
    with pytest.raises(HfHubHTTPError) as raised:
        hub.push_round(
            settings(tmp_path, True), store, saved, api=HfApi(endpoint=ENDPOINT, token=TOKEN)
        )
    assert raised.value.response is not None
    assert raised.value.response.status_code == 401
    assert raised.value.response.request.url.path == "/api/repos/create"
    # Nothing was uploaded: the error surfaced before any preupload or commit.
    assert fake_hub.calls()[0] == ("POST", "/api/repos/create")
    assert not [path for _, path in fake_hub.calls() if "/preupload/" in path or "/commit/" in path]
