"""`agentrun upload` of every real file into a real server: stored once, bad records skipped."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from agentrun import AgentRun, Client, init, load_agent_runs
from agentrun._cli import main
from agentrun.v1 import workflow_pb2
from agentrun_server import Server


async def upload(server: Server, *args: str) -> int:
    return await asyncio.to_thread(main, ["upload", "--server", f"127.0.0.1:{server.port}", *args])


def collection_names(server: Server) -> list[str]:
    with Client(f"127.0.0.1:{server.port}") as client:
        return [c.name for c in client.list_collections()]


def run_count(server: Server, name: str) -> int:
    with Client(f"127.0.0.1:{server.port}") as client:
        (collection,) = [c for c in client.list_collections() if c.name == name]
        return collection.run_count


async def test_every_real_file_uploads_once(
    server: Server, real_files: tuple[Path, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    paths = [str(p) for p in real_files]
    assert await upload(server, "--collection", "real", *paths) == 0
    assert "217 runs read; 217 stored, 0 duplicates, 0 rejected" in capsys.readouterr().out
    assert await asyncio.to_thread(run_count, server, "real") == 217
    # Ids are derived from the files: a second upload stores nothing.
    assert await upload(server, "--collection", "real", *paths) == 0
    assert "217 runs read; 0 stored, 217 duplicates" in capsys.readouterr().out
    assert await asyncio.to_thread(run_count, server, "real") == 217


async def test_bad_records_stop_the_upload_unless_skipped(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = {"transcripts": {"t": {"messages": [{"role": "user", "content": "hi"}]}}}
    bad = {"transcripts": {"t": {"messages": [{"role": "narrator", "content": "hi"}]}}}
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, bad, {**good, "name": "two"})))

    assert await upload(server, "--collection", "mixed", str(path)) == 1
    err = capsys.readouterr().err
    assert f"{path}: line 2: field transcripts.t.messages.0" in err
    assert await asyncio.to_thread(collection_names, server) == []

    assert await upload(server, "--collection", "mixed", "--skip-invalid", str(path)) == 0
    out, err = capsys.readouterr()
    assert "2 runs read (1 invalid skipped); 2 stored" in out
    assert f"skipped {path}: line 2:" in err
    assert await asyncio.to_thread(run_count, server, "mixed") == 2


async def test_a_collection_reads_back_whole_and_enqueues_again_for_regrading(
    server: Server, tau_bench_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"127.0.0.1:{server.port}"
    written = load_agent_runs(tau_bench_path)

    def write_and_read_back() -> tuple[list[AgentRun], AgentRun]:
        writer = init("airline", server_url=url)
        writer.log_agent_runs(written)
        assert writer.finish().accepted == 200
        with Client(url) as client:
            client.apply_workflow(
                workflow_pb2.Workflow(name="regrade", stages=[workflow_pb2.Stage(name="grade")])
            )
            collection = client.get_collection(name="airline")
            runs = list(client.iter_runs(collection.id, page_size=7))
            return runs, client.get_run(runs[3].id)

    runs, fourth = await asyncio.to_thread(write_and_read_back)
    assert runs == written  # every run, in order, equal as models
    assert fourth == written[3]

    enqueue = ["enqueue", "regrade", "--collection", "airline", "--server", url]
    assert await asyncio.to_thread(main, enqueue) == 0
    assert "200 runs of 'airline' enqueued into 'regrade'" in capsys.readouterr().out
    assert await asyncio.to_thread(main, enqueue) == 0  # their tasks are still ready
    assert "0 runs of 'airline' enqueued into 'regrade'; 200 skipped" in capsys.readouterr().out
    assert await asyncio.to_thread(main, [*enqueue[:2], "--collection", "nope", *enqueue[4:]]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
