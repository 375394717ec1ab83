"""Celery with Redis, the peer of ready -> stage function latency: one worker (solo pool, one
task at a time), tasks sent one at a time, each recording how long after its send it started.

    python bench/peer_celery.py redis://127.0.0.1:6379/15 SAMPLES

Needs `make install-bench` (celery is not a dependency of agentrun) and a Redis server. Prints
the waits in seconds, one per line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from celery import Celery

BROKER = os.environ.get("PEER_CELERY_BROKER", "redis://127.0.0.1:6379/15")
WAITS = "agentrun-bench:waits"

app = Celery("peer_celery", broker=BROKER)
app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1, broker_connection_retry=False)


@app.task(name="record")
def record(sent: float) -> None:
    """The stage function: note how long after its send it started."""
    _redis().rpush(WAITS, f"{sent!r} {time.time() - sent!r}")


def _redis() -> Any:
    """The broker's Redis (no result backend: the waits go to a list there)."""
    import redis

    return redis.Redis.from_url(BROKER)


def waits(samples: int) -> list[float]:
    """Send `samples` tasks one at a time to a worker started here; their waits, seconds."""
    client = _redis()
    client.flushdb()
    worker = subprocess.Popen(
        [
            sys.executable,
            *("-m", "celery", "-A", "peer_celery", "worker", "--pool", "solo"),
            *("--without-gossip", "--without-mingle", "--without-heartbeat"),
            *("--loglevel", "WARNING"),
        ],
        cwd=Path(__file__).parent,
        env={**os.environ, "PEER_CELERY_BROKER": BROKER},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        record.apply_async((time.time(),))  # the worker is up once this one is recorded
        deadline = time.monotonic() + 60
        while client.llen(WAITS) < 1:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError("the Celery worker did not start")
            time.sleep(0.05)
        client.delete(WAITS)
        for _ in range(samples):
            record.apply_async((time.time(),))
            time.sleep(0.005)  # the worker is idle again before the next task is sent
        while len({i.split()[0] for i in client.lrange(WAITS, 0, -1)}) < samples:
            time.sleep(0.01)
        # By the send time: a task delivered twice (Redis redelivers what a worker has not
        # acknowledged) counts once, its first start.
        first: dict[str, float] = {}
        for item in client.lrange(WAITS, 0, -1):
            sent, wait = item.decode().split()
            first.setdefault(sent, float(wait))
        return list(first.values())
    finally:
        worker.terminate()
        worker.wait(timeout=30)


if __name__ == "__main__":
    BROKER = sys.argv[1]
    app.conf.broker_url = BROKER
    for wait in waits(int(sys.argv[2])):
        print(wait)
