"""The generated code in core/src/onpolicy/v1 must match proto/ (run `make proto`)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools")
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iproto",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *protos,
        ],
        cwd=ROOT,
        check=True,
    )
    generated = ROOT / "core" / "src" / "onpolicy" / "v1"
    for fresh in (tmp_path / "onpolicy" / "v1").iterdir():
        if (
            fresh.name.endswith("_pb2_grpc.py")
            and "service "
            not in (
                ROOT / "proto" / "onpolicy" / "v1" / fresh.name.replace("_pb2_grpc.py", ".proto")
            ).read_text()
        ):
            continue  # no services in that file: nothing to keep
        committed = generated / fresh.name
        assert committed.exists(), f"{fresh.name} missing: run `make proto`"
        assert committed.read_text() == fresh.read_text(), f"{fresh.name} is stale: make proto"
