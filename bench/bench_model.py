"""Data-model throughput on the real runs: wire encoding, decoding, rendering and to_text.

    make bench-model            # or: python bench/bench_model.py [--seconds 2]

Prints runs/s and MB/s for model -> proto bytes and proto bytes -> model over the 217 real runs
(tau-bench and Inspect, read from ../shared/data), and tokens/s of `to_text` on the largest real
run, beside tiktoken's raw encoding speed on the same text (the floor any splitter pays).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from agentrun import agent_run_from_proto, agent_run_to_proto, load_agent_runs
from agentrun._tokens import count_tokens, encoding
from agentrun.v1 import agent_run_pb2
from processes import machine  # bench/ is on sys.path when run

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("AGENTRUN_SHARED_DATA", ROOT.parent / "shared" / "data"))
FILES = (
    DATA / "tau-bench" / "gpt-4o-airline.json",
    DATA / "inspect-intercode-ctf" / "log.eval",
    DATA / "inspect-intercode-ctf" / "ctf.json",
)


def timed(fn: Callable[[], object], seconds: float) -> tuple[int, float]:
    """Call `fn` repeatedly for about `seconds`; return (calls, elapsed seconds)."""
    fn()  # warm up
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        calls += 1
    return calls, elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args()
    missing = [str(p) for p in FILES if not p.exists()]
    if missing:
        print(f"skipped: real data not found: {', '.join(missing)} (set AGENTRUN_SHARED_DATA)")
        return 0

    runs = [run for path in FILES for run in load_agent_runs(path)]
    types = [type(run.metadata) for run in runs]
    encoded = [agent_run_to_proto(run).SerializeToString() for run in runs]
    total_bytes = sum(map(len, encoded))
    print(machine())
    print(
        f"{len(runs)} real runs, {total_bytes / 1e6:.2f} MB encoded "
        f"(mean {total_bytes / len(runs) / 1e3:.1f} KB)\n"
    )

    def encode_all() -> None:
        for run in runs:
            agent_run_to_proto(run).SerializeToString()

    def decode_all() -> None:
        for data, metadata_type in zip(encoded, types, strict=True):
            agent_run_from_proto(agent_run_pb2.AgentRun.FromString(data), metadata_type)

    def render_all() -> None:
        for run in runs:
            _ = run.text

    print(f"{'operation':<34}{'runs/s':>10}{'MB/s':>10}")
    for name, fn in (
        ("model -> proto bytes", encode_all),
        ("proto bytes -> model", decode_all),
        (".text (render)", render_all),
    ):
        calls, elapsed = timed(fn, args.seconds)
        rate = calls * len(runs) / elapsed
        print(f"{name:<34}{rate:>10.0f}{rate * total_bytes / len(runs) / 1e6:>10.1f}")

    largest = max(runs, key=lambda r: len(r.text))
    text = largest.text
    tokens = count_tokens(text)
    print(f"\nlargest run: {largest.name!r}, {len(text) / 1e3:.0f} k chars, {tokens} tokens")
    print(f"{'operation':<34}{'tokens/s':>12}{'chunks':>8}")
    calls, elapsed = timed(lambda: encoding().encode_ordinary(text), args.seconds)
    print(f"{'tiktoken encode (reference)':<34}{calls * tokens / elapsed:>12.0f}{'':>8}")
    for limit in (256, 1024, 8192):
        chunks = largest.to_text(limit)
        calls, elapsed = timed(lambda limit=limit: largest.to_text(limit), args.seconds)
        print(f"{f'to_text({limit})':<34}{calls * tokens / elapsed:>12.0f}{len(chunks):>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
