"""onpolicy.preflight: the start-up checks in front of the services (models cached, GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from onpolicy import preflight


def cache_model(hub: Path, name: str, revision: str = "abc123") -> Path:
    repo = hub / ("models--" + name.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_finds_a_cached_hub_model_and_a_model_folder(hf_home: Path, tmp_path: Path) -> None:
    snapshot = cache_model(hf_home / "hub", "org/model")
    assert preflight.find_model("org/model") == snapshot
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert preflight.find_model(str(folder)) == folder


def test_a_missing_model_is_named_with_what_to_do(hf_home: Path) -> None:
    with pytest.raises(preflight.PreflightError) as exc:
        preflight.find_model("org/missing")
    message = str(exc.value)
    assert "org/missing" in message and str(hf_home / "hub") in message
    assert "job/onpolicy-models" in message and "onpolicy-hf-token" in message
    # A snapshot without config.json (an interrupted download) is missing too.
    cache_model(hf_home / "hub", "org/half").joinpath("config.json").unlink()
    with pytest.raises(preflight.PreflightError):
        preflight.find_model("org/half")
    with pytest.raises(preflight.PreflightError, match=r"no config\.json"):
        preflight.find_model("/nonexistent/model")


def test_waits_for_a_model_then_gives_up(hf_home: Path, capsys) -> None:
    with pytest.raises(preflight.PreflightError, match="org/late"):
        preflight.wait_for_models(["org/late"], wait_s=0.05, poll_s=0.01)
    assert "waiting for 1 model" in capsys.readouterr().err
    cache_model(hf_home / "hub", "org/late")
    assert preflight.wait_for_models(["org/late"], wait_s=0)[0].name == "abc123"


def test_main_skips_empty_models_and_execs_the_service(
    hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_model(hf_home / "hub", "org/model")
    execs = []
    monkeypatch.setattr(preflight.os, "execvp", lambda f, argv: execs.append(argv))
    # An unset optional model ($(REWARD_MODEL) = "") is no model.
    args = ["--model=org/model", "--model=", "--", "python", "-m", "onpolicy_judge"]
    assert preflight.main(args) == 0
    assert execs == [["python", "-m", "onpolicy_judge"]]
    assert preflight.main(["--model=org/other", "--", "true"]) == 1
    assert len(execs) == 1  # a failed check never starts the service


def test_gpu_check_fails_with_the_reason_when_torch_sees_no_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(preflight, "_driver_version", lambda: None)
    with pytest.raises(preflight.PreflightError) as exc:
        preflight.check_gpu()
    message = str(exc.value)
    assert "CUDA 13.0" in message and "driver 580" in message
    assert "nvidia.com/gpu" in message
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(preflight.PreflightError, match="CPU build"):
        preflight.check_gpu()
    execs = []
    monkeypatch.setattr(preflight.os, "execvp", lambda f, argv: execs.append(argv))
    assert preflight.main(["--gpu", "--", "python", "-m", "onpolicy_trainer"]) == 1
    assert execs == []


def test_fetch_downloads_hub_models_and_explains_a_gated_one(
    hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import GatedRepoError

    fetched = []

    def fake_download(name: str, cache_dir: Path, ignore_patterns: list[str]) -> str:
        if name == "org/gated":
            error = GatedRepoError.__new__(GatedRepoError)  # without an HTTP response
            Exception.__init__(error, "401 gated")
            raise error
        fetched.append((name, Path(cache_dir)))
        return str(cache_model(Path(cache_dir), name))

    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the images' setting; the fetcher lifts it
    assert preflight.main(["--fetch", "--model=org/model", "--model="]) == 0
    assert fetched == [("org/model", hf_home / "hub")]
    with pytest.raises(preflight.PreflightError, match="onpolicy-hf-token"):
        preflight.fetch_models(["org/gated"])
