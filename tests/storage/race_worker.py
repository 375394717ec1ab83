"""One process of the storage race test: its own storage object on the shared database, claiming
and settling as fast as it can, and presenting stale and repeated settles on purpose.

    python -m tests.storage.race_worker DATABASE_URL SEED

Prints one JSON object: what it was granted, and how each of its settles was answered.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

from agentrun_server.storage import (
    AckCode,
    ClaimRequest,
    Completion,
    Extension,
    Failure,
    LeasedTask,
    Release,
    open_storage,
)

NEXT = {"a": "next", "b": ""}


async def work(url: str, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    storage = await open_storage(url)
    granted: list[tuple[int, str, int]] = []
    honest: list[tuple[str, int, str, int, str]] = []  # (kind, task, lease, code, result)
    stale: list[tuple[str, int, int, str]] = []  # (kind, task, code, result)
    settled: list[LeasedTask] = []  # leases this process settled: presented again, stale
    idle = 0
    try:
        while idle < 20:
            limit = rng.randint(1, 24)
            request = ClaimRequest(f"race-{seed}", "race", {"a": limit, "b": limit}, limit, 600.0)
            leased = await storage.claim(request, time.time())
            if not leased:
                idle += 1
                await asyncio.sleep(0.01)
                continue
            idle = 0
            await asyncio.sleep(rng.random() * 0.004)  # "work": lets the other processes in
            granted += [(t.task_id, t.lease_id, t.attempt) for t in leased]
            completions, failures, releases, extensions = [], [], [], []
            for task in leased:
                roll = rng.random()
                if roll < 0.1:
                    failures.append(
                        Failure(task.task_id, task.lease_id, "boom", retry_after_seconds=0.0)
                    )
                elif roll < 0.2:
                    releases.append(Release(task.task_id, task.lease_id))
                else:
                    if roll < 0.3:
                        extensions.append(Extension(task.task_id, task.lease_id, 600.0))
                    completions.append(Completion(task.task_id, task.lease_id, NEXT[task.stage]))
            now = time.time()
            for kind, items, call in (
                ("extend", extensions, storage.extend),
                ("complete", completions, storage.complete),
                ("fail", failures, storage.fail),
                ("release", releases, storage.release),
            ):
                if not items:
                    continue
                acks = await call(items, now)  # type: ignore[operator]
                honest += [(kind, a.task_id, a.lease_id, int(a.code), a.result) for a in acks]
                if kind != "extend" and rng.random() < 0.3:  # a resend after a "lost" ack
                    again = await call(items, time.time())  # type: ignore[operator]
                    honest += [
                        (kind + "-repeat", a.task_id, a.lease_id, int(a.code), a.result)
                        for a in again
                    ]
            # Old leases of this process, presented again as if they were current.
            for old in rng.sample(settled, min(len(settled), 3)):
                (ack,) = await storage.complete(
                    [Completion(old.task_id, old.lease_id, "next" if old.stage == "b" else "")],
                    time.time(),
                )
                stale.append(("complete", old.task_id, int(ack.code), ack.result))
                (ack,) = await storage.release([Release(old.task_id, old.lease_id)], time.time())
                stale.append(("release-after-settle", old.task_id, int(ack.code), ack.result))
            settled += leased
    finally:
        await storage.close()
    return {"granted": granted, "honest": honest, "stale": stale, "ok": int(AckCode.OK)}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(work(sys.argv[1], int(sys.argv[2])))))
