"""The storage race test: four processes, each with its own storage object on one database,
claiming and settling thousands of tasks at once (and presenting stale and repeated settles).

Leases are long and nothing sweeps, so a worker's settle of a lease it was granted must be
accepted: had a claim moved a task already leased to another worker, that worker's settle would
be refused. A stale settle must never be accepted, and every task must end done exactly once.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from pathlib import Path

from agentrun_server.storage import NewRun, StageDef, Storage, WorkflowDef

ROOT = Path(__file__).resolve().parents[2]
RUNS = 1500
PROCESSES = 4


async def test_concurrent_processes_never_share_a_lease_nor_accept_a_stale_settle(
    database_url: str, storage: Storage
) -> None:
    await storage.put_workflow(
        WorkflowDef(
            "race",
            (StageDef("a", {"next": "b"}, max_attempts=100), StageDef("b", max_attempts=100)),
        ),
        1.0,
    )
    collection, _ = await storage.create_collection("race", "", "race", 1.0)
    for start in range(0, RUNS, 500):
        runs = [NewRun(f"run-{i}", None, b"r") for i in range(start, start + 500)]
        await storage.insert_runs(collection.id, runs, 1.0)

    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.storage.race_worker",
            database_url,
            str(seed),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        for seed in range(PROCESSES)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(w.communicate() for w in workers)), 120)
    assert [w.returncode for w in workers] == [0] * PROCESSES
    results = [json.loads(out) for out, _ in outputs]
    ok = results[0]["ok"]

    granted = [lease for r in results for lease in r["granted"]]
    assert len({lease_id for _, lease_id, _ in granted}) == len(granted)  # fresh lease ids
    assert all(r["granted"] for r in results), "every process took part"

    honest = [item for r in results for item in r["honest"]]
    first = [item for item in honest if not item[0].endswith("-repeat")]
    refused = [item for item in first if item[3] != ok]
    assert refused == [], f"{len(refused)} settles of a held lease refused: {refused[:5]}"
    assert {result for kind, *_, result in first} <= {"done", "retry", "released", "extended"}
    for kind, task, lease, code, result in honest:
        if kind in ("complete-repeat", "fail-repeat"):
            assert (code, result) == (ok, "repeat"), (kind, task, lease, code, result)
        elif kind == "release-repeat" and code == ok:
            assert result == "repeat"

    stale = [item for r in results for item in r["stale"]]
    assert stale, "the workers presented old leases"
    for kind, task, code, result in stale:
        if kind == "complete":  # an old lease, and a pathway its stage lacks: never accepted
            assert code != ok, (kind, task)
        elif code == ok:  # a release resent while the task still waits: a repeat, nothing more
            assert result == "repeat", (kind, task, result)

    # Every lease granted ended in exactly one accepted settle by its holder (extensions aside):
    # no lease was superseded by another granted while it was current.
    grants = Counter(task for task, _, _ in granted)
    settles = Counter(task for kind, task, _, _, _ in first if kind != "extend")
    assert grants == settles

    # Every task done exactly once; nothing left behind.
    done = Counter(task for kind, task, _, code, result in first if result == "done")
    assert len(done) == 2 * RUNS and set(done.values()) == {1}
    backlog = {s.stage: s for s in await storage.backlog("race", 2.0)}
    for stage in ("a", "b"):
        counts = backlog[stage]
        assert (counts.done, counts.ready, counts.scheduled, counts.leased, counts.dead) == (
            RUNS,
            0,
            0,
            0,
            0,
        )
