"""Run benchmarks: ``python -m benchmarks [name ...]``.

Each ``benchmarks/bench_<name>.py`` has ``run(args) -> dict``; its result is written to
``benchmarks/results/<name>.json`` (``<name>-<variant>.json`` when the result names a
variant, e.g. a GPU run) and summarised in the README between the markers
``<!-- bench:<key> -->`` and ``<!-- /bench:<key> -->`` (its ``summary`` field).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
README = HERE.parent / "README.md"


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def update_readme(name: str, summary: str) -> None:
    if not README.exists():
        return
    text = README.read_text()
    pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.S)
    if pattern.search(text):
        README.write_text(pattern.sub(lambda m: m.group(1) + summary + "\n" + m.group(2), text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="*", help=f"which to run (default all: {available()})")
    parser.add_argument("--quick", action="store_true", help="smaller workloads, for a smoke run")
    parser.add_argument(
        "--pairs", type=int, help="trainer: pairs per pass (default 16 on CPU, 512 on a GPU)"
    )
    parser.add_argument("--cells", nargs="+", help="faults: only these cells of the matrix")
    parser.add_argument("--seeds", type=int, help="demo: runs (seeds) per lineage (default 3)")
    parser.add_argument("--rounds", type=int, help="peers: DPO rounds per system (default 3)")
    parser.add_argument(
        "--prompts-per-round",
        type=int,
        help="peers: training pairs per round (default: the demo's, 40)",
    )
    parser.add_argument("--repeats", type=int, help="peers: runs of each system (default 1)")
    parser.add_argument("--eval-size", type=int, help="peers: held-out prompts (default 48)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="peers: keep the finished repeats of a cut-off run (results/peers-partial.json) "
        "and run only the rest up to --repeats",
    )
    args = parser.parse_args(argv)
    names = args.names or available()
    unknown = set(names) - set(available())
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; available: {available()}")
    (HERE / "results").mkdir(exist_ok=True)
    failed = 0
    for name in names:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        print(f"== {name}", flush=True)
        started = time.time()
        try:
            result = module.run(args)
        except Exception as exc:  # report and go on with the others
            print(f"!! {name} failed: {exc!r}", file=sys.stderr)
            failed += 1
            continue
        result.setdefault("machine", f"{platform.machine()}, {platform.node()}")
        result["finished_unix"] = int(time.time())
        result["bench_wall_s"] = round(time.time() - started, 1)
        result.setdefault("wall_s", result["bench_wall_s"])  # a bench may time its own part
        # A variant (e.g. the same benchmark on a GPU) is kept beside the default result.
        key = f"{name}-{result['variant']}" if result.get("variant") else name
        out = HERE / "results" / f"{key}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        if summary := result.get("summary"):
            update_readme(key, summary)
        print(json.dumps(result, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
