"""The storage contract: the backlog's counts, kept as tasks change state, always equal a count of
the tasks themselves, whatever sequence of operations moved them."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from agentrun_server.storage import (
    ClaimRequest,
    Completion,
    Failure,
    Release,
    Storage,
    TaskState,
)

from .conftest import ingest


async def recount(storage: Storage) -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    after = 0
    while True:
        page, more = await storage.list_tasks("w", "", None, after, 500)
        counts.update((t.stage, t.state.value) for t in page)
        if not more:
            return counts
        after = page[-1].id


@pytest.mark.parametrize("seed", range(3))
async def test_kept_counts_equal_a_recount_after_any_operations(
    storage: Storage, seed: int
) -> None:
    rng = random.Random(seed)
    await ingest(storage, 60, now=0.0)
    now = 1.0
    for _ in range(120):
        now += rng.choice((0.5, 5.0, 40.0))
        op = rng.random()
        stages = {"a": rng.randint(0, 5), "b": rng.randint(0, 5)}
        if op < 0.5:
            leased = await storage.claim(ClaimRequest("s", "w", stages, 8, None), now)
            completions, failures, releases = [], [], []
            for task in leased:
                roll = rng.random()
                pathway = rng.choice(("next", "stop", "bogus")) if task.stage == "a" else ""
                if roll < 0.6:
                    completions.append(Completion(task.task_id, task.lease_id, pathway))
                elif roll < 0.75:
                    failures.append(Failure(task.task_id, task.lease_id, "x", rng.random() < 0.3))
                elif roll < 0.85:
                    releases.append(Release(task.task_id, task.lease_id))
                # else: held until it expires
            await storage.complete(completions, now)
            await storage.fail(failures, now)
            await storage.release(releases, now)
        elif op < 0.6:
            await storage.sweep(now, 15.0)
        elif op < 0.7:
            await storage.cancel("w", rng.choice(("a", "b", "")), [], now)
        elif op < 0.8:
            await storage.redrive("w", "", [], now)
        elif op < 0.9:
            runs = [f"r{rng.randrange(60)}" for _ in range(5)]
            await storage.enqueue("w", rng.choice(("", "b")), runs, 0, now)
        else:
            await storage.end_session_leases("s", now)
    counted = await recount(storage)
    kept = {
        (s.stage, state): getattr(s, state)
        for s in await storage.backlog("w", now)
        for state in ("done", "dead", "cancelled", "leased")
    }
    for (stage, state), n in kept.items():
        assert counted[(stage, state)] == n, (stage, state)
    for stage in await storage.backlog("w", now):
        assert stage.ready + stage.scheduled == counted[(stage.stage, TaskState.READY.value)]
    assert sum(counted.values()) > 60  # the operations did move tasks around
