"""Several GPUs in one trainer pod: a DPO round, data-parallel, in child processes.

The service process keeps the Kafka side (buffer, save, publish, commit). A round with
``train_processes`` > 1 runs as

    python -m torch.distributed.run --standalone --nproc-per-node N -m onpolicy_trainer.launch JOB

which is what ``accelerate launch --multi_gpu`` runs underneath. Every rank calls
:func:`~onpolicy_trainer.dpo.train_round` on the same rows; TRL's trainer (through
accelerate) gives each rank its share of every batch and all-reduces the gradients (NCCL on
GPUs, gloo on CPUs); rank 0 saves the policy and writes ``result.json``. ``JOB`` is a folder
holding ``settings.json``, ``rows.json`` and ``args.json``. The effective batch is
``train_processes x per_device_batch_size x gradient_accumulation_steps``.
"""

from __future__ import annotations

import json
import logging
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
    if processes(settings) > 1:
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
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={n}",
            "-m",
            "onpolicy_trainer.launch",
            str(job),
        ]
        log.info("DPO round on %d pairs in %d processes", len(rows), n)
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
    metrics |= {"pairs": float(len(rows)), "seconds": seconds, "processes": float(n)}
    metrics["pairs_per_s"] = len(rows) / seconds if seconds > 0 else float("inf")
    return RoundResult(metrics, Path(output_dir), len(rows), seconds, result["log_history"])


def _terminate(proc: subprocess.Popen[Any]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    """One rank (started by torchrun): train on the job's rows; rank 0 writes the result."""
    from onpolicy.telemetry import setup_logging

    job = Path((argv or sys.argv[1:])[0])
    settings = TrainerSettings.model_validate(json.loads((job / "settings.json").read_text()))
    setup_logging(settings.log, f"trainer-rank{os.environ.get('RANK', '0')}")
    args = json.loads((job / "args.json").read_text())
    rows = json.loads((job / "rows.json").read_text())
    result = train_round(settings, rows, args["previous_adapter"], args["output_dir"])
    if int(os.environ.get("RANK", "0")) == 0:
        (job / "result.json").write_text(
            json.dumps({"metrics": result.metrics, "log_history": result.log_history})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
