"""Dockerfiles: multi-stage, pinned base images, a non-root user in the final stage; and the
.dockerignore keeps local state out of the build context."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _deploy import REPO

DOCKERFILES = [REPO / "services" / s / "Dockerfile" for s in ("sampler", "judge", "trainer")] + [
    REPO / "deploy" / "docker" / "vllm-cpu.Dockerfile"
]


def stages(text: str) -> tuple[dict[str, str], list[str], list[list[str]]]:
    """ARG defaults, FROM images (ARGs resolved) and each stage's instructions."""
    args: dict[str, str] = {}
    froms: list[str] = []
    body: list[list[str]] = []
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "ARG" and not froms and "=" in rest:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip().strip('"')
        elif word == "FROM":
            image = rest.split()[0]
            froms.append(
                re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
            )
            body.append([])
        elif body:
            body[-1].append(f"{word} {rest}")
    return args, froms, body


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_dockerfile_is_multistage_pinned_and_non_root(path: Path) -> None:
    assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    _, froms, body = stages(path.read_text())
    assert len(froms) >= 2, "multi-stage"
    aliases = set()
    for line in path.read_text().splitlines():
        m = re.match(r"\s*FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if m:
            aliases.add(m.group(1))
    for image in froms:
        if image in aliases:
            continue
        name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
        assert name and tag and tag != "latest", f"unpinned base image {image}"
        assert re.search(r"\d", tag) or tag == "digest", f"unpinned base image {image}"
    users = [ln.split()[1] for ln in body[-1] if ln.startswith("USER ")]
    assert users, "the final stage sets a USER"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = (REPO / ".dockerignore").read_text().split()
    for needed in (".git", "**/.venv", "**/__pycache__", "tests"):
        assert needed in patterns
