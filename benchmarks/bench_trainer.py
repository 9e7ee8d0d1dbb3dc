"""Trainer: pairs/s of one service round vs a plain TRL DPOTrainer script on the same pairs.

Both train SmolLM2-135M with the same LoRA and DPO settings on the same synthetic pairs.
The plain script is timed from loading the model to ``save_pretrained``; the service round
from producing the pairs to Kafka to its PolicyUpdate being published (consume, buffer,
train, save adapter + Parquet dataset, publish), on a real local broker. Each side runs in
a fresh Python process of its own, as it would be deployed.
ratio = mean service pairs/s / mean plain pairs/s (goal >= 0.95).

On the CPU the two sides run side by side, at the same time: each in its own process pinned
to a core of its own with one torch thread, both clocks started together, cores swapped every
pass (4 passes). The machines this runs on are shared VMs whose speed moves in phases of a
minute or two (the same 4-pair plain TRL run took 13.5-15.7 s in some runs, 17.8-21.6 s in
others), so passes run one after the other read 0.89-0.98 in three runs of nearly the same
code, each side's time depending on the phases it landed in. Side by side, both see the same.

On a GPU the sides run one after the other (2 passes alternating who goes first), both in
bf16 (the service's rule: weights and autocast in bf16 where the GPU supports it), on more
pairs (``--pairs``, default 512) so that steps, not start-up, dominate; the result goes to
``results/trainer-gpu.json`` and names the device.

FSDP mode (CPU: 2 processes, gloo): the service with ``distributed=fsdp`` and
``train_processes=2`` (torchrun, FSDP2 full shard through accelerate) against a plain TRL
DPOTrainer script run by torchrun with 2 processes under the same accelerate FSDP config, on
the same pairs; both timed from start to the merged weights a vLLM without LoRA serves (the
service: pairs produced to the PolicyUpdate of its merged hand-off; the plain script: the
saved adapter merged with PEFT, as bench peers' one-process recipe does), one after the
other, alternating who goes first (``FSDP_PASSES`` passes; each side uses both cores). The
first runs timed the plain side to its adapter only: 0.936 (the merge, ~3 s of a 40 s round,
was the service's alone). ``fsdp_ratio`` = mean service pairs/s / mean plain pairs/s (goal >= 0.95).
``ONPOLICY_BENCH_TRAINER_MODES`` picks the modes (``lora,fsdp``, the default: both); a run of
one mode keeps the other's figures from the results file.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

PAIRS_FULL = 16
PAIRS_QUICK = 8
PAIRS_GPU = 512
PAIRS_FSDP = 8
# Passes of each side in FSDP mode: one after the other, a pass's speed moved 10-20% with the
# machine's phases in the first runs (2 passes), more than the gap measured.
FSDP_PASSES = 4
RESULTS = Path(__file__).parent / "results" / "trainer.json"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def plain_trl(settings: Any, rows: list[dict[str, Any]], out: Path, start: Any = None) -> float:
    """The baseline: what a user would write with TRL directly. Returns seconds.

    ``start``: a barrier both sides wait at, set up, before their clocks start.
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    if start is not None:
        start.wait()
    started = time.monotonic()
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    model = AutoModelForCausalLM.from_pretrained(
        settings.model, dtype=torch.bfloat16 if bf16 else torch.float32
    )
    dataset = Dataset.from_list(
        [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    )
    with tempfile.TemporaryDirectory() as scratch:
        args = DPOConfig(
            output_dir=scratch,
            beta=settings.beta,
            loss_type=settings.loss_types,
            learning_rate=settings.learning_rate,
            num_train_epochs=settings.num_epochs,
            per_device_train_batch_size=settings.per_device_batch_size,
            gradient_accumulation_steps=settings.gradient_accumulation_steps,
            max_length=settings.max_length,
            bf16=bf16,  # TRL defaults to bf16, which needs a GPU
            seed=settings.seed,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
        )
        peft_config = LoraConfig(
            r=settings.lora_r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            target_modules=list(settings.target_modules),
            task_type="CAUSAL_LM",
        )
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        trainer.train()
        trainer.model.save_pretrained(out)
    return time.monotonic() - started


def service_round(
    settings: Any, pairs: list[Any], start: Any = None
) -> tuple[float, dict[str, float]]:
    """One round of the real service (processor + runner) fed through Kafka."""
    from onpolicy import messages as m
    from onpolicy.bus import Producer, ensure_topics, read_topic
    from onpolicy.settings import HttpSettings
    from onpolicy.telemetry import Metrics, ServiceServer
    from onpolicy_trainer.app import build

    ensure_topics(settings.kafka, settings.topics)
    metrics = Metrics("trainer")
    processor = build(settings, metrics, ServiceServer("trainer", metrics, HttpSettings(port=0)))
    runner = processor.runner  # type: ignore[attr-defined]
    thread = threading.Thread(
        target=processor.run, kwargs={"install_signal_handlers": False}, daemon=True
    )
    thread.start()
    producer = Producer(settings.kafka)
    try:
        time.sleep(3)  # let the consumer join its group before the clock starts
        if start is not None:
            start.wait()
        started = time.time()
        for pair in pairs:
            producer.send(settings.topics.name("pairs"), pair)
        producer.flush()
        deadline = time.monotonic() + 3600
        while not (runner.rounds and runner.rounds[-1].published):
            if time.monotonic() > deadline:
                raise TimeoutError("the service round did not publish within an hour")
            # Seldom: this thread shares the cores with the round it times. The clock stops
            # at the PolicyUpdate's own timestamp, not here.
            time.sleep(1)
    finally:
        producer.close()
        processor.stop()
        thread.join(60)
    [update] = read_topic(settings.kafka, settings.topics.name("policy"), m.PolicyUpdate)
    assert update.message.version == 1 and update.message.num_pairs == len(pairs)
    # The record's create time, stamped by the service's producer on this machine's clock
    # when it sent the update.
    seconds = update.timestamp_ms / 1000 - started
    return seconds, dict(update.message.metrics)


def _fresh_process(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a new Python process, as each side runs in practice.

    In one shared process the side that ran second inherited the first one's state: libgomp
    keeps an OpenMP worker pool per thread that ever ran torch ops (the plain script trains in
    the main thread, the service in a worker thread), and with more workers than cores it stops
    spin-waiting and sleeps between parallel regions (measured on 2 cores: 82k voluntary
    context switches in the service's round instead of 15k in a fresh process).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _on_core(core: int, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` pinned to one core with one torch thread (in a fresh process)."""
    os.sched_setaffinity(0, {core})  # threads started from here on inherit it
    import torch

    torch.set_num_threads(1)
    return fn(*args)


def _side_by_side(plain: tuple[Any, ...], service: tuple[Any, ...], cores: tuple[int, int]) -> Any:
    """Run ``plain_trl(*plain)`` and ``service_round(*service)`` at once, each in a fresh
    process on its own core; both clocks start together. Returns (plain, service) results."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Barrier(2, timeout=600)
        with (
            ProcessPoolExecutor(1, mp_context=ctx) as a,
            ProcessPoolExecutor(1, mp_context=ctx) as b,
        ):
            fa = a.submit(_on_core, cores[0], plain_trl, *plain, start)
            fb = b.submit(_on_core, cores[1], service_round, *service, start)
            return fa.result(), fb.result()


def _pass(
    plain: tuple[Any, ...], service: tuple[Any, ...], i: int, cores: tuple[int, int] | None
) -> tuple[float, tuple[float, dict[str, float]]]:
    """Pass ``i``: (plain seconds, (service seconds, round metrics)); side by side on
    ``cores`` (plain's, service's) when given."""
    if cores is not None:
        return _side_by_side(plain, service, cores)
    # One after the other, alternating who goes first (plain, service | service, plain | ...):
    # drift and order effects hit both sides alike.
    if i % 2 == 0:
        plain_s = _fresh_process(plain_trl, *plain)
        return plain_s, _fresh_process(service_round, *service)
    service_result = _fresh_process(service_round, *service)
    return _fresh_process(plain_trl, *plain), service_result


def _device() -> str | None:
    """The GPU's name, or None on a CPU-only machine."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _plain_fsdp_rank(job: Path) -> None:
    """One rank of the plain FSDP baseline (run by torchrun): what a user would write with
    TRL and accelerate's FSDP config, on CPU ranks (gloo)."""
    import json

    import torch
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    spec = json.loads((job / "plain.json").read_text())
    s = spec["settings"]

    class CpuFsdpDPOTrainer(DPOTrainer):
        # accelerate 1.15 applies an FSDP plugin only on GPUs; on CPU ranks it would train
        # DDP. The same switch as the service's (dpo._fsdp_on_cpu): accelerate's FSDP path.
        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            if state.distributed_type == DistributedType.MULTI_CPU:
                state.distributed_type = DistributedType.FSDP
                state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                self.is_fsdp_enabled = True

    tokenizer = AutoTokenizer.from_pretrained(s["model"])
    model = AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.float32)
    dataset = Dataset.from_list(spec["rows"])
    with tempfile.TemporaryDirectory() as scratch:
        config = DPOConfig(
            output_dir=scratch,
            beta=s["beta"],
            loss_type=[s["loss_type"]],
            learning_rate=s["learning_rate"],
            num_train_epochs=s["num_epochs"],
            per_device_train_batch_size=s["per_device_batch_size"],
            gradient_accumulation_steps=s["gradient_accumulation_steps"],
            max_length=s["max_length"],
            bf16=False,
            use_cpu=True,
            seed=s["seed"],
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            fsdp=True,
            fsdp_config={
                "version": 2,
                "reshard_after_forward": True,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "activation_checkpointing": True,
                "state_dict_type": "FULL_STATE_DICT",
            },
            activation_checkpointing=False,
        )
        trainer = CpuFsdpDPOTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=LoraConfig(
                r=s["lora_r"],
                lora_alpha=s["lora_alpha"],
                lora_dropout=s["lora_dropout"],
                target_modules=list(s["target_modules"]),
                task_type="CAUSAL_LM",
            ),
        )
        trainer.train()
        # The service's gather (PyTorch's get_model_state_dict, waited on): accelerate's
        # get_state_dict hands back tensors without storage on CPU ranks, which safetensors
        # refuses; saving the same way keeps the two sides' cost equal.
        from onpolicy_trainer.dpo import _full_state_dict, _materialized

        state_dict = _materialized(_full_state_dict(trainer.model))
        if trainer.accelerator.is_main_process:
            # PEFT's save_pretrained(state_dict=...) keeps nothing here: it matches module
            # names, which FSDP's activation checkpointing wraps. The adapter's entries,
            # named as PEFT names them, and its config:
            from safetensors.torch import save_file

            out = Path(spec["out"])
            out.mkdir(parents=True, exist_ok=True)
            weights = {
                k.replace(".default.", "."): v.contiguous()
                for k, v in state_dict.items()
                if ".lora_" in k and ".default." in k
            }
            save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
            trainer.model.peft_config["default"].save_pretrained(str(out))
        trainer.accelerator.wait_for_everyone()


def plain_trl_fsdp(settings: Any, rows: list[dict[str, Any]], out: Path) -> float:
    """The plain FSDP baseline under torchrun, 2 processes: seconds from start to saved."""
    import json
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="bench-plain-fsdp-") as tmp:
        job = Path(tmp)
        text_rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
        spec = {"settings": settings.model_dump(mode="json"), "rows": text_rows, "out": str(out)}
        (job / "plain.json").write_text(json.dumps(spec))
        started = time.monotonic()
        subprocess.run(
            [
                *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
                *("--nproc-per-node=2", "-m", "benchmarks.bench_trainer"),
                *("--plain-fsdp-rank", str(job)),
            ],
            check=True,
        )
        adapter = out / "adapter_model.safetensors"
        if not adapter.exists() or adapter.stat().st_size < 1024:
            raise RuntimeError("the plain FSDP baseline saved no adapter weights")
        plain_merge(settings.model, out, out / "merged")
        seconds = time.monotonic() - started
    return seconds


def plain_merge(base_model: str, adapter: Path, folder: Path) -> None:
    """What a plain script does to serve its adapter with a vLLM without LoRA (as the
    service's merged hand-off does, and bench peers' one-process recipe): PEFT's merge into
    float32 base weights, saved in the base's dtype."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().to(torch.bfloat16)
    merged.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(folder)


def run_fsdp(bootstrap: str, model: Path, tmp_path: Path, n: int) -> dict[str, Any]:
    """The FSDP mode: service (2 ranks, FSDP2) vs plain TRL under the same FSDP config."""
    from transformers import AutoTokenizer

    from onpolicy.settings import KafkaSettings, TopicSettings
    from onpolicy_trainer.pairs import to_rows
    from onpolicy_trainer.settings import TrainerSettings
    from onpolicy_trainer.synthetic import make_pairs

    def settings_for(tag: str) -> TrainerSettings:
        return TrainerSettings(
            round_protocol=False,
            kafka=KafkaSettings(bootstrap_servers=bootstrap, linger_ms=0),
            topics=TopicSettings(prefix=f"bench-{uuid.uuid4().hex[:8]}.", partitions=2),
            model=str(model),
            checkpoint_uri=str(tmp_path / f"ckpt-fsdp-{tag}"),
            round_size=n,
            max_length=160,
            per_device_batch_size=2,
            train_processes=2,
            distributed="fsdp",
        )

    pairs = make_pairs(n, tokenizer=AutoTokenizer.from_pretrained(str(model)))
    rows = to_rows(pairs)
    plain_rates: list[float] = []
    service_rates: list[float] = []
    round_metrics: dict[str, float] = {}
    for i in range(FSDP_PASSES):
        settings = settings_for(f"p{i}")
        out = tmp_path / f"plain-fsdp-{i}"
        if i % 2 == 0:
            plain_s = plain_trl_fsdp(settings, rows, out)
            service_s, round_metrics = _fresh_process(service_round, settings, pairs)
        else:
            service_s, round_metrics = _fresh_process(service_round, settings, pairs)
            plain_s = plain_trl_fsdp(settings, rows, out)
        assert round_metrics.get("fsdp") == 1.0, round_metrics
        adapter = tmp_path / f"ckpt-fsdp-p{i}" / "policy-v1" / "adapter_model.safetensors"
        assert adapter.stat().st_size > 1024, "the service saved no adapter weights"
        plain_rates.append(n / plain_s)
        service_rates.append(n / service_s)
    plain_pps = statistics.fmean(plain_rates)
    service_pps = statistics.fmean(service_rates)
    ratio = service_pps / plain_pps
    return {
        "fsdp_ratio": round(ratio, 3),
        "fsdp_goal": 0.95,
        "fsdp_service_pairs_per_s": round(service_pps, 4),
        "fsdp_plain_trl_pairs_per_s": round(plain_pps, 4),
        "fsdp_passes": {
            "plain_trl": [round(x, 4) for x in plain_rates],
            "service": [round(x, 4) for x in service_rates],
        },
        "fsdp_round_metrics": {k: round(v, 4) for k, v in round_metrics.items()},
        "fsdp_setup": (
            f"SmolLM2-135M-Instruct, LoRA r=8, {n} pairs, 2 processes (torchrun, gloo), FSDP2 "
            "full shard through accelerate (its FSDP path switched on for CPU ranks, both "
            "sides), activation checkpointing, batch 2 per rank, max_length 160, fp32; both "
            "sides end with the merged weights a vLLM without LoRA serves (the service's "
            "hand-off; the plain script merges with PEFT); one after the other alternating, "
            f"{FSDP_PASSES} passes, load avg {os.getloadavg()[0]:.1f}"
        ),
        "fsdp_summary": (
            f"trainer FSDP (2 CPU processes): service {service_pps:.3f} pairs/s vs plain TRL "
            f"under the same FSDP config {plain_pps:.3f} pairs/s = {ratio:.3f}x (goal >= 0.95)"
        ),
    }


def _modes() -> set[str]:
    raw = os.environ.get("ONPOLICY_BENCH_TRAINER_MODES", "lora,fsdp")
    modes = {m.strip() for m in raw.split(",") if m.strip()}
    if not modes or modes - {"lora", "fsdp"}:
        raise ValueError(f"ONPOLICY_BENCH_TRAINER_MODES={raw!r}: lora, fsdp or both")
    return modes


def run(args: Any) -> dict[str, Any]:
    import json

    modes = _modes()
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    result = run_lora(args, "fsdp" in modes) if "lora" in modes else None
    if result is None:  # fsdp only: the lora mode's figures stay as they were
        result = {k: v for k, v in previous.items() if not k.startswith("fsdp_")}
        # The clocks of that earlier run, kept under names of their own.
        for key in ("finished_unix", "wall_s", "bench_wall_s"):
            if key in result:
                result[f"lora_{key}"] = result.pop(key)
        result |= _fsdp_only(args)
    if result.get("gpu", "").startswith("none") and "fsdp_summary" in result:
        result["summary"] = result["summary"].split("; FSDP:")[0] + (
            "; FSDP: " + result["fsdp_summary"]
        )
    return result


def _fsdp_only(args: Any) -> dict[str, Any]:
    from onpolicy.stack import KafkaBroker, ensure_default_model
    from onpolicy.stack.settings import StackSettings

    n = getattr(args, "pairs", None) or PAIRS_FSDP
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        tmp_path = Path(tmp)
        stack = StackSettings(
            state_dir=tmp_path / "stack",
            kafka_port=_free_port(),
            kafka_controller_port=_free_port(),
        )
        model = ensure_default_model(stack)
        broker = None
        bootstrap = os.environ.get("ONPOLICY_TEST_BOOTSTRAP")
        if not bootstrap:
            broker = KafkaBroker(stack)
            broker.start()
            bootstrap = broker.bootstrap
        try:
            return run_fsdp(bootstrap, model, tmp_path, n)
        finally:
            if broker is not None:
                broker.stop()


def run_lora(args: Any, fsdp: bool = False) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from onpolicy.settings import KafkaSettings, TopicSettings
    from onpolicy.stack import KafkaBroker, ensure_default_model
    from onpolicy.stack.settings import StackSettings
    from onpolicy_trainer.pairs import to_rows
    from onpolicy_trainer.settings import TrainerSettings
    from onpolicy_trainer.synthetic import make_pairs

    gpu = _device()
    quick = getattr(args, "quick", False)
    n = getattr(args, "pairs", None) or (PAIRS_QUICK if quick else PAIRS_GPU if gpu else PAIRS_FULL)
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        tmp_path = Path(tmp)
        stack = StackSettings(
            state_dir=tmp_path / "stack",
            kafka_port=_free_port(),
            kafka_controller_port=_free_port(),
        )
        model = ensure_default_model(stack)
        broker = None
        bootstrap = os.environ.get("ONPOLICY_TEST_BOOTSTRAP")
        if not bootstrap:
            broker = KafkaBroker(stack)
            broker.start()
            bootstrap = broker.bootstrap
        passes = 1 if quick else 2 if gpu else 4
        usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        side_by_side = not gpu and len(usable) >= 2
        cores = (usable[0], usable[1]) if side_by_side else (0, 0)
        pass_cores: list[dict[str, int]] = []
        plain_rates: list[float] = []
        service_rates: list[float] = []
        try:

            def settings_for(tag: str, round_size: int = n) -> TrainerSettings:
                # A fresh topic prefix and checkpoint store per service pass: each starts at v0.
                return TrainerSettings(
                    round_protocol=False,  # pairs are published directly
                    kafka=KafkaSettings(bootstrap_servers=bootstrap, linger_ms=0),
                    topics=TopicSettings(prefix=f"bench-{uuid.uuid4().hex[:8]}.", partitions=2),
                    model=str(model),
                    checkpoint_uri=str(tmp_path / f"ckpt-{tag}"),
                    round_size=round_size,
                    # Side by side each side has one core; the service's own setting says so.
                    torch_threads=1 if side_by_side else 0,
                    # The longest synthetic pair is 152 tokens: none is dropped (too_long).
                    max_length=160,
                )

            settings = settings_for("warmup")
            pairs = make_pairs(n, tokenizer=AutoTokenizer.from_pretrained(str(model)))
            rows = to_rows(pairs)

            def on(i: int) -> tuple[int, int] | None:
                # Swap cores every pass: a core that is slower (its host neighbours) slows
                # each side alike.
                return (cores if i % 2 == 0 else cores[::-1]) if side_by_side else None

            # Warm both paths alike: imports, the model files in the page cache (CUDA context),
            # and for the service the broker: a fresh JVM compiles its group, fetch and produce
            # paths on first use (measured once on 2 cores: the broker took 46 ms of CPU a
            # second during the first service pass's training, 31 during a later one's), which
            # a long-running broker has long done.
            _pass(
                (settings, rows[:4], tmp_path / "warmup"),
                (settings_for("warmup", round_size=4), pairs[:4]),
                0,
                on(0),
            )
            for i in range(passes):
                plain_s, (service_s, round_metrics) = _pass(
                    (settings, rows, tmp_path / f"plain-{i}"),
                    (settings_for(f"p{i}"), pairs),
                    i,
                    on(i),
                )
                plain_rates.append(n / plain_s)
                service_rates.append(n / service_s)
                if (pinned := on(i)) is not None:
                    pass_cores.append({"plain_trl": pinned[0], "service": pinned[1]})
            fsdp_result = (
                run_fsdp(bootstrap, model, tmp_path, PAIRS_FSDP) if fsdp and not gpu else {}
            )
        finally:
            if broker is not None:
                broker.stop()

    plain_pps = statistics.fmean(plain_rates)
    service_pps = statistics.fmean(service_rates)
    plain_s, service_s = n / plain_pps, n / service_pps
    ratio = service_pps / plain_pps
    load = os.getloadavg()[0]
    how = (
        "side by side, one core and one torch thread each"
        if side_by_side
        else "one after the other"
    )
    where = (
        f"bf16 on one {gpu}"
        if gpu
        else f"fp32 on {os.cpu_count()} CPU cores (load avg {load:.1f}), no GPU, {how}"
    )
    setup = (
        f"SmolLM2-135M-Instruct, LoRA r={settings.lora_r} on {','.join(settings.target_modules)}, "
        f"{n} synthetic pairs, batch {settings.per_device_batch_size}, max_length "
        f"{settings.max_length}, 1 epoch, {where}"
    )
    result: dict[str, Any] = {
        "ratio": round(ratio, 3),
        "goal": 0.95,
        "service_pairs_per_s": round(service_pps, 4),
        "plain_trl_pairs_per_s": round(plain_pps, 4),
        "service_seconds": round(service_s, 1),
        "plain_trl_seconds": round(plain_s, 1),
        "pairs": n,
        "passes": {
            "plain_trl": [round(x, 4) for x in plain_rates],
            "service": [round(x, 4) for x in service_rates],
        },
        "method": how,
        **({"pass_cores": pass_cores} if side_by_side else {}),
        "round_metrics": {k: round(v, 4) for k, v in round_metrics.items()},
        "setup": setup,
        "gpu": gpu or "none (this run: CPU only)",
        "summary": (
            f"trainer{' (GPU)' if gpu else ''}: service round {service_pps:.3f} pairs/s vs plain "
            f"TRL DPOTrainer {plain_pps:.3f} pairs/s = {ratio:.3f}x (goal >= 0.95); {n} pairs, "
            f"SmolLM2-135M LoRA r={settings.lora_r}, "
            + (
                f"bf16 on one {gpu}"
                if gpu
                else f"fp32 on {os.cpu_count()} CPU cores ({how}), load avg {load:.1f}"
            )
        ),
    }
    if gpu:
        result["variant"] = "gpu"  # results/trainer-gpu.json: the CPU result stays beside it
    return result | fsdp_result


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--plain-fsdp-rank"]:
        _plain_fsdp_rank(Path(sys.argv[2]))
