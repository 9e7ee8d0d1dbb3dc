"""Several GPUs in one trainer pod: a DPO round, data-parallel, in child processes.

The service process keeps the Kafka side (buffer, save, publish, commit). A round with
``train_processes`` > 1 runs as

    python -m torch.distributed.run --standalone --nproc-per-node N -m onpolicy_trainer.launch JOB

which is what ``accelerate launch --multi_gpu`` runs underneath. Every rank calls
:func:`~onpolicy_trainer.dpo.train_round` on the same rows; TRL's trainer (through
accelerate) gives each rank its share of every batch and all-reduces the gradients (NCCL on
GPUs, gloo on CPUs); rank 0 saves the policy and writes ``result.json``. ``JOB`` is a folder
holding ``settings.json``, ``rows.json`` and ``args.json``. The effective batch is
``train_processes x per_device_batch_size x gradient_accumulation_steps`` (x ``nnodes``).

Several nodes (``nnodes`` > 1, e.g. the trainer StatefulSet of ``deploy/k8s/overlays/
multinode``): the service's torchrun hosts a c10d rendezvous at ``rdzv_endpoint`` and every
other node runs ``python -m onpolicy_trainer.launch --follow``, which starts a torchrun for
each round (``-m onpolicy_trainer.launch --worker``) that joins it. The worker ranks have no
job folder: rank 0, on the service's node, broadcasts the settings, the rows and the
previous policy's files to them. c10d numbers the nodes in the order of their addresses
(``--local-addr``, env ``PET_LOCAL_ADDR``; default the host's FQDN), so the service's node
must sort first (``trainer-0`` does): a round whose rank 0 is elsewhere fails naming this.
Rank 0 saves the policy, as on one node.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from onpolicy_trainer.dpo import RoundAborted, RoundResult, preload, train_round
from onpolicy_trainer.pairs import Row
from onpolicy_trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

# Settings that only the service process uses; the ranks need the training ones.
_SERVICE_ONLY = {"kafka", "topics", "log", "http"}


def processes(settings: TrainerSettings) -> int:
    """How many processes a round uses (``train_processes``; 0: one per visible GPU)."""
    if settings.train_processes:
        return settings.train_processes
    import torch

    return max(torch.cuda.device_count(), 1)


def train_fn(settings: TrainerSettings) -> Callable[..., RoundResult]:
    """The round function for these settings: in the service, or data-parallel.

    In the service, the training stack is imported here, at start (see ``dpo.preload``).
    """
    if processes(settings) > 1 or settings.nnodes > 1:
        return train_round_distributed
    preload()
    return train_round


def train_round_distributed(
    settings: TrainerSettings,
    rows: Sequence[Row],
    previous_adapter: str | Path | None,
    output_dir: str | Path,
    should_stop: Callable[[], bool] | None = None,
) -> RoundResult:
    """:func:`train_round`'s contract, run by ``processes(settings)`` ranks under torchrun.

    ``should_stop`` is asked every half second; when it says yes the ranks get SIGTERM and
    the round ends with :class:`RoundAborted` (nothing saved, as in one process).
    """
    n = processes(settings)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="onpolicy-ddp-") as tmp:
        job = Path(tmp)
        (job / "settings.json").write_text(
            json.dumps(settings.model_dump(mode="json", exclude=_SERVICE_ONLY))
        )
        (job / "rows.json").write_text(json.dumps([dict(row) for row in rows]))
        (job / "args.json").write_text(
            json.dumps(
                {
                    "previous_adapter": str(previous_adapter) if previous_adapter else None,
                    "output_dir": str(output_dir),
                }
            )
        )
        command = torchrun_command(settings, n, str(job))
        log.info(
            "DPO round on %d pairs in %d processes x %d nodes (%s)",
            len(rows),
            n,
            settings.nnodes,
            settings.distributed,
        )
        # Its own session, so a stop reaches torchrun and every rank at once.
        proc = subprocess.Popen(command, start_new_session=True)
        try:
            while proc.poll() is None:
                if should_stop is not None and should_stop():
                    _terminate(proc)
                    raise RoundAborted("stopping: the round was cut short and is not saved")
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                _terminate(proc)
        if proc.returncode != 0:
            raise RuntimeError(
                f"the data-parallel DPO round failed (torchrun exit {proc.returncode}); "
                "its ranks' errors are in the log above"
            )
        result = json.loads((job / "result.json").read_text())
    seconds = time.monotonic() - started
    metrics = dict(result["metrics"])
    # What rank 0 spent in train_round (model load, steps, save); the rest of ``seconds`` is
    # starting torchrun and the ranks' imports, paid every round.
    metrics["rank_seconds"] = float(metrics.get("seconds", math.nan))
    metrics |= {"pairs": float(len(rows)), "seconds": seconds}
    metrics["processes"] = float(n * settings.nnodes)
    metrics["pairs_per_s"] = len(rows) / seconds if seconds > 0 else float("inf")
    return RoundResult(metrics, Path(output_dir), len(rows), seconds, result["log_history"])


def torchrun_command(settings: TrainerSettings, n: int, job: str) -> list[str]:
    """torchrun for one round: ``job`` is the job folder (the service) or ``--worker``."""
    if settings.nnodes == 1:
        rendezvous = ["--standalone"]
    else:
        host = job != "--worker"  # the service's torchrun hosts the c10d store
        rendezvous = [
            f"--nnodes={settings.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={settings.rdzv_endpoint}",
            f"--rdzv-id={settings.rdzv_id}",
            f"--rdzv-conf=is_host={str(host).lower()}",
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *rendezvous,
        f"--nproc-per-node={n}",
        "-m",
        "onpolicy_trainer.launch",
        job,
    ]


def _terminate(proc: subprocess.Popen[Any]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _multi_node() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) != int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _job_from_rank0(job: Path | None) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    """Every rank's (settings, rows, args): read from the job folder on the service's node,
    broadcast from rank 0 to the other nodes' ranks (which have no folder)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)  # accelerate then uses this group
    group = dist.new_group(backend="gloo")  # objects travel on the CPU
    have = [None] * dist.get_world_size()
    dist.all_gather_object(have, job is not None, group=group)
    if not have[0]:
        raise RuntimeError(
            "rank 0 is not on the service's node (c10d numbers nodes by address): give the "
            "service's node the first address (--local-addr, env PET_LOCAL_ADDR), as "
            "trainer-0 of the StatefulSet has"
        )
    payload: list[Any] = [None]
    if dist.get_rank() == 0:
        assert job is not None
        args = json.loads((job / "args.json").read_text())
        previous = args["previous_adapter"]
        files = {}
        if previous:
            root = Path(previous)
            files = {
                str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()
            }
        payload = [
            (
                json.loads((job / "settings.json").read_text()),
                json.loads((job / "rows.json").read_text()),
                args,
                files,
            )
        ]
    dist.broadcast_object_list(payload, src=0, group=group)
    settings, rows, args, files = payload[0]
    if job is None:  # a worker node: the previous policy's files, in a folder of its own
        args = dict(args, output_dir=tempfile.mkdtemp(prefix="onpolicy-worker-out-"))
        if files:
            folder = Path(tempfile.mkdtemp(prefix="onpolicy-worker-prev-"))
            for name, data in files.items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
            args["previous_adapter"] = str(folder)
    return settings, rows, args


def main(argv: list[str] | None = None) -> int:
    """One rank (started by torchrun): train on the job's rows; rank 0 writes the result.

    ``--worker``: a rank on another node, given the job by rank 0. ``--follow``: a worker
    node's loop, one torchrun per round (see the module docstring).
    """
    from onpolicy.telemetry import setup_logging

    arg = (argv or sys.argv[1:])[0]
    if arg == "--follow":
        return follow()
    rank = os.environ.get("RANK", "0")
    job = None if arg == "--worker" else Path(arg)
    if job is None or _multi_node():
        raw_settings, rows, args = _job_from_rank0(job)
    else:
        raw_settings = json.loads((job / "settings.json").read_text())
        args = json.loads((job / "args.json").read_text())
        rows = json.loads((job / "rows.json").read_text())
    settings = TrainerSettings.model_validate(raw_settings)
    setup_logging(settings.log, f"trainer-rank{rank}")
    result = train_round(settings, rows, args["previous_adapter"], args["output_dir"])
    if int(rank) == 0 and job is not None:
        (job / "result.json").write_text(
            json.dumps({"metrics": result.metrics, "log_history": result.log_history})
        )
    return 0


def follow(settings: TrainerSettings | None = None) -> int:
    """A worker node (nnodes > 1): join every round's rendezvous, until SIGTERM.

    Between rounds the service's rendezvous is closed: torchrun fails to reach it and is
    started again after a short wait.
    """
    from onpolicy.telemetry import setup_logging

    settings = settings or TrainerSettings()
    setup_logging(settings.log, "trainer-worker")
    if settings.nnodes < 2:
        raise SystemExit("launch --follow is for nnodes > 1 (ONPOLICY_TRAINER_NNODES)")
    command = torchrun_command(settings, processes(settings), "--worker")
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        proc = subprocess.Popen(command, start_new_session=True)
        while proc.poll() is None and not stopping:
            time.sleep(0.5)
        if proc.poll() is None:
            _terminate(proc)
            break
        log.info("worker torchrun exited %s", proc.returncode)
        if proc.returncode != 0 and not stopping:
            time.sleep(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
