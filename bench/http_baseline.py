"""The reference ingestion path users have today: Docent-style HTTP+JSON batch POSTs into SQLite.

As Docent's writer and server do (../shared/research/ingestion.md, section 2.5): the client POSTs
`{"agent_runs": [run.model_dump(mode="json"), ...]}` batches of 1,000 runs from 2 worker threads;
the server parses the JSON, validates every run with pydantic (`AgentRun.model_validate`) and stores
the batch in one transaction under a per-collection lock. It is kinder to the baseline than Docent
is: stdlib HTTP with keep-alive instead of FastAPI behind nginx, and each run stored as one JSON
blob instead of normalized rows.

    python bench/http_baseline.py --db PATH   # serves; prints "listening on PORT"
"""

from __future__ import annotations

import argparse
import http.client
import json
import sqlite3
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pydantic import BaseModel

from agentrun import AgentRun


def docent_dump(run: AgentRun) -> dict[str, object]:
    """What Docent's writer sends: `model_dump(mode="json")`, which renders `.text` too."""
    return run.model_dump(mode="json")


def plain_dump(run: AgentRun) -> dict[str, object]:
    """The fields alone, without the rendered `.text` (a kinder baseline)."""
    return BaseModel.model_dump(run, mode="json")


def serve(db_path: str) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS agent_runs (id TEXT PRIMARY KEY, collection_id TEXT, data TEXT)"
    )
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            collection = self.path.split("/")[2]
            body = self.rfile.read(int(self.headers["Content-Length"]))
            runs = [
                AgentRun.model_validate({k: v for k, v in r.items() if k != "text"})
                for r in json.loads(body)["agent_runs"]
            ]
            rows = [(run.id, collection, run.model_dump_json()) for run in runs]
            with lock:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT OR IGNORE INTO agent_runs VALUES (?, ?, ?)", rows)
                conn.execute("COMMIT")
            reply = json.dumps({"stored": len(rows)}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


def upload(
    port: int,
    runs: Sequence[AgentRun],
    dump: Callable[[AgentRun], dict[str, object]] = docent_dump,
    batch_size: int = 1000,
    workers: int = 2,
) -> int:
    """POST `runs` in batches from `workers` threads, as Docent's writer does; return runs stored."""
    batches = [runs[i : i + batch_size] for i in range(0, len(runs), batch_size)]
    stored = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal stored
        connection = http.client.HTTPConnection("127.0.0.1", port)
        while True:
            with lock:
                if not batches:
                    break
                batch = batches.pop(0)
            body = json.dumps({"agent_runs": [dump(r) for r in batch]})
            connection.request(
                "POST", "/rest/bench/agent_runs", body, {"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            count = json.loads(response.read())["stored"]
            with lock:
                stored += count
        connection.close()

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return stored


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    serve(parser.parse_args().db)
