"""What the web console costs a reader: the collection page at a million runs, and the run page
of a 50 MB run.

    make bench-console          # or: python bench/bench_console.py [--runs 1000000]

`agentrun serve` (console on) starts on a fresh SQLite file; N runs of about 1 KB are uploaded
with the writer. Then, side by side in one run:

- the collection page (`/collections/NAME`, 50 runs newest first) over HTTP: the first page,
  pages 2-200 by their cursors, and the last pages (the oldest runs), median and max of the time
  to the whole answer, beside the `ListAgentRuns` call under it (the same page over gRPC);
  filtered by state and by a score;
- a run of 50 MB made of real messages (the tau-bench runs of ../shared/data, repeated), stored
  as a live run's events (over the message limit: `GetAgentRun` refuses it, the page reads its
  first events): its page's time to first byte, to the first message's bytes, and to the whole
  answer over HTTP, and in headless Chromium (Debian's, `make install-browser`) the first
  contentful paint, beside reading the same run's events over gRPC (`WatchAgentRun`).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
from bench_scale import runs  # bench/ is on sys.path when run

from agentrun import AgentRunWriter, Client, load_agent_runs
from agentrun.v1 import ingestion_service_pb2 as pb
from agentrun.v1 import ingestion_service_pb2_grpc as pb_grpc
from processes import machine, stop

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
TAU_BENCH = DATA / "tau-bench" / "gpt-4o-airline.json"
BIG_RUN_BYTES = 50 * 1024 * 1024


def serve(db: Path) -> tuple[subprocess.Popen[str], str, str]:
    command = [sys.executable, "-m", "agentrun._cli", "serve", "--db", f"sqlite:///{db}"]
    command += ["--port", "0", "--metrics-port", "-1", "--web-port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    grpc_url = ""
    for line in process.stdout:
        if match := re.search(r"serving .* on [\d.]+:(\d+)", line):
            grpc_url = f"127.0.0.1:{match[1]}"
        if match := re.search(r"console on (\S+?)/?$", line.strip()):
            return process, grpc_url, match[1]
    raise RuntimeError("agentrun serve exited before serving")


def get(url: str) -> tuple[float, float, float, bytes]:
    """Seconds to the first byte, to the first message (`<article`), and to the whole answer."""
    started = time.perf_counter()
    with urllib.request.urlopen(url) as response:
        first = response.read(1)
        first_byte = time.perf_counter() - started
        body, to_message = first, 0.0
        while chunk := response.read(65536):
            body += chunk
            if not to_message and b"<article" in body:
                to_message = time.perf_counter() - started
        return first_byte, to_message, time.perf_counter() - started, body


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:.1f} ms, max {max(values) * 1000:.1f} ms"


def collection_pages(web: str, grpc_url: str, count: int) -> None:
    with Client(grpc_url) as client:
        collection = client.get_collection(name="scale")
    stub_channel = grpc.insecure_channel(grpc_url)
    stub = pb_grpc.IngestionServiceStub(stub_channel)

    def page(token: str = "", **query: str) -> tuple[float, str]:
        args = "&".join(f"{k}={urllib.parse.quote(v)}" for k, v in query.items())
        url = f"{web}/collections/scale?{args}" + (f"&page={token}" if token else "")
        _, _, total, body = get(url)
        found = re.search(rb'href="[^"]*[?&;]page=(\d+)"', body)
        return total, found[1].decode() if found else ""

    def grpc_page(token: str = "") -> tuple[float, str]:
        started = time.perf_counter()
        listed = stub.ListAgentRuns(
            pb.ListAgentRunsRequest(
                collection_id=collection.id,
                page_size=50,
                page_token=token,
                view=pb.AGENT_RUN_VIEW_BASIC,
                newest_first=True,
            )
        )
        return time.perf_counter() - started, listed.next_page_token

    for _ in range(5):  # warm both
        page(), grpc_page()
    first = [page()[0] for _ in range(30)]
    first_grpc = [grpc_page()[0] for _ in range(30)]
    later, later_grpc, token, grpc_token = [], [], "", ""
    for _ in range(200):
        took, token = page(token)
        later.append(took)
        took, grpc_token = grpc_page(grpc_token)
        later_grpc.append(took)
    oldest = str(count // 50 * 50 + 1)  # a cursor among the oldest runs (tokens are positions)
    last = [page("100")[0] for _ in range(10)] + [page(oldest)[0] for _ in range(10)]
    print(f"collection page at {count:,} runs (50 runs newest first), whole HTTP answer:")
    print(f"  first page        {ms(first)}   | ListAgentRuns under it: {ms(first_grpc)}")
    print(f"  pages 2-201       {ms(later)}   | ListAgentRuns: {ms(later_grpc)}")
    print(f"  the oldest pages  {ms(last)}")
    for label, query in (
        ("state=finished", {"state": "finished"}),
        ("scores.reward < 0.5", {"where": "scores.reward < 0.5"}),
        ("metadata.model = rare (0.2 %)", {"where": "metadata.model = rare"}),
    ):
        print(f"  filtered {label}: {ms([page(**query)[0] for _ in range(20)])}")
    stub_channel.close()


def big_run(grpc_url: str, web: str) -> None:
    if not TAU_BENCH.exists():
        print(f"50 MB run page: skipped, real runs not found at {TAU_BENCH}")
        return
    messages = [
        m
        for run in load_agent_runs(TAU_BENCH)
        for t in run.transcripts.values()
        for m in t.messages
    ]
    with Client(grpc_url) as client:
        collection = client.create_collection("big").collection
    writer = AgentRunWriter(collection.id, server_url=grpc_url)
    stored, count = 0, 0
    with writer.live_run("big-run", name="a 50 MB run") as run:
        while stored < BIG_RUN_BYTES:
            batch = messages[count % len(messages) :][:200]
            run.append("main", batch)
            stored += sum(len(m.model_dump_json()) for m in batch)
            count += len(batch)
    writer.finish()
    with Client(grpc_url) as client:
        summary = client.get_run_summary("big-run")
    channel = grpc.insecure_channel(grpc_url, options=[("grpc.max_receive_message_length", -1)])
    stub = pb_grpc.IngestionServiceStub(channel)
    to_first, whole_grpc, size = [], [], 0
    for _ in range(5):  # the run is over the message limit: GetAgentRun cannot answer it whole
        started, size = time.perf_counter(), 0
        for response in stub.WatchAgentRun(pb.WatchAgentRunRequest(agent_run_id="big-run")):
            if not size:
                to_first.append(time.perf_counter() - started)
            size += sum(e.patch.ByteSize() for e in response.events)
        whole_grpc.append(time.perf_counter() - started)
    channel.close()
    first_bytes, to_message, whole = [], [], []
    for _ in range(5):
        a, b, c, body = get(f"{web}/runs/big-run")
        first_bytes.append(a), to_message.append(b), whole.append(c)
    print(
        f"run page of a {size / 1e6:.0f} MB run ({summary.message_count:,} real messages), "
        f"over HTTP: first byte {ms(first_bytes)}; first message {ms(to_message)}; "
        f"whole page ({len(body) / 1e6:.1f} MB) {ms(whole)}"
    )
    print(
        f"  beside it, WatchAgentRun of the same run over gRPC: first answer {ms(to_first)}; "
        f"all its events {ms(whole_grpc)}"
    )
    chromium = shutil.which("chromium")
    if chromium is None:
        print("  first paint: skipped (chromium not installed: make install-browser)")
        return
    from playwright.sync_api import sync_playwright

    with Client(grpc_url) as client:
        small = next(client.iter_run_ids(client.get_collection(name="scale").id))

    def paints(run_id: str) -> list[float]:
        found = []
        for _ in range(5):
            page = browser.new_page()
            page.goto(f"{web}/runs/{run_id}", wait_until="commit")
            page.wait_for_selector("article.msg")
            paint = page.evaluate(
                "performance.getEntriesByName('first-contentful-paint')[0]?.startTime ?? -1"
            )
            found.append(paint / 1000)
            page.close()
        return found

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        paints(small)  # warm
        big, one_kb = paints("big-run"), paints(small)
        browser.close()
    print(
        f"  in Chromium, first contentful paint: {ms(big)} (goal 300 ms); "
        f"beside it, a 1 KB run's page: {ms(one_kb)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"bench-console on {machine()}")
    with tempfile.TemporaryDirectory() as folder:
        process, grpc_url, web = serve(Path(folder) / "console.db")
        try:
            with Client(grpc_url) as client:
                collection = client.create_collection("scale").collection.id
            writer = AgentRunWriter(collection, server_url=grpc_url, batch_size=1000)
            started = time.perf_counter()
            for start in range(0, args.runs, 50_000):
                writer.log_agent_runs(runs(start, min(50_000, args.runs - start)))
            writer.finish()
            print(f"stored {args.runs:,} runs in {time.perf_counter() - started:.0f} s")
            collection_pages(web, grpc_url, args.runs)
            big_run(grpc_url, web)
        finally:
            stop(process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
