"""Every mistake gets an honest answer (issue 28): what a user typed wrong is named with what
exists, a command that cannot do what was asked exits non-zero, and nothing secret is echoed.
The server runs in a subprocess on SQLite; the CLI runs as users run it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from agentrun import (
    AgentRun,
    AgentRunWriter,
    BaseAgentRunMetadata,
    Client,
    LiveRunError,
    RpcError,
    TaskState,
    Transcript,
    WorkflowSpec,
)
from agentrun.chat import AssistantMessage, UserMessage

from ..certificates import Authority
from ..processes import ServerProcess
from ..processes import agentrun_cli as cli


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    yield from _with_grading(tmp_path / "agentrun.db")


@pytest.fixture(scope="module")
def read_only_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the tests that change nothing."""
    yield from _with_grading(tmp_path_factory.mktemp("read-only") / "agentrun.db")


def _with_grading(db: Path) -> Iterator[ServerProcess]:
    with ServerProcess(db) as process:
        with Client(process.url) as client:
            client.apply_workflow(
                WorkflowSpec.model_validate(
                    {
                        "name": "grading",
                        "stages": [
                            {"name": "triage", "pathways": {"graded": "review"}},
                            {"name": "review"},
                        ],
                    }
                )
            )
        yield process


@pytest.mark.parametrize(
    "command",
    [
        ("tasks", "list", "gradnig"),
        ("tasks", "list", "grading", "--stage", "reveiw"),
        ("tasks", "redrive", "gradnig", "--stage", "review"),
        ("tasks", "redrive", "grading", "--stage", "reveiw"),
        ("tasks", "cancel", "gradnig", "--stage", "review"),
        ("tasks", "cancel", "grading", "--stage", "reveiw"),
    ],
)
def test_a_misspelled_workflow_or_stage_is_not_found_naming_those_that_exist(
    read_only_server: ServerProcess, command: tuple[str, ...]
) -> None:
    server = read_only_server
    done = cli(server, *command)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    if "gradnig" in command:
        assert "no workflow named 'gradnig'; workflows: 'grading'" in done.stderr, done.stderr
    else:
        assert "has no stage 'reveiw'; stages: 'triage', 'review'" in done.stderr, done.stderr
    with Client(server.url) as client:
        with pytest.raises(RpcError, match="workflows: 'grading'"):
            client.backlog("gradnig")
        with pytest.raises(RpcError, match="workflows: 'grading'"):  # a Runner's first call
            client.get_workflow("gradnig")


def test_a_runner_that_left_dead_tasks_exits_3(server: ServerProcess, tmp_path: Path) -> None:
    with Client(server.url) as client:
        collection = client.create_collection("evals", workflow="grading").collection
    run = AgentRun(
        id="doomed",
        transcripts={"t": Transcript(messages=[UserMessage(content="hi")])},
        metadata=BaseAgentRunMetadata(scores={}),
    )
    writer = AgentRunWriter(collection.id, server_url=server.url)
    writer.log_agent_runs([run])
    assert writer.finish().ok
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            """
            from agentrun import Runner
            runner = Runner(workflow="grading")

            @runner.stage("triage")
            def triage(run):
                raise RuntimeError("the grader is down")

            runner.run()
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script), "--server", server.url, "--num-retries", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    assert "the grader is down" in done.stderr


def test_a_command_piped_into_head_ends_quietly(server: ServerProcess) -> None:
    with Client(server.url) as client:
        collection = client.create_collection("evals").collection
    long = AgentRun(  # printed whole by tail: far more than a pipe's buffer
        id="long",
        transcripts={
            "main": Transcript(
                messages=[UserMessage(content=f"{i} " + "x" * 200) for i in range(3000)]
            )
        },
        metadata=BaseAgentRunMetadata(scores={}),
    )
    writer = AgentRunWriter(collection.id, server_url=server.url)
    writer.log_agent_runs([long])
    assert writer.finish().ok
    piped = subprocess.run(
        f"{sys.executable} -m agentrun._cli tail long --server {server.url} | head -n 2",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert [line[:12] for line in piped.stdout.splitlines()] == ["[1] main use", "[2] main use"]
    assert "Traceback" not in piped.stderr and "BrokenPipeError" not in piped.stderr, piped.stderr


def test_tail_of_a_finished_run_prints_it_whole(server: ServerProcess) -> None:
    with Client(server.url) as client:
        collection = client.create_collection("evals").collection
    run = AgentRun(
        id="uploaded-whole",
        transcripts={
            "main": Transcript(
                messages=[
                    UserMessage(content="Where is my order?"),
                    AssistantMessage(content="It ships tomorrow."),
                ]
            )
        },
        metadata=BaseAgentRunMetadata(scores={}),
    )
    writer = AgentRunWriter(collection.id, server_url=server.url)
    writer.log_agent_runs([run])
    assert writer.finish().ok
    done = cli(server, "tail", "uploaded-whole")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "main user: Where is my order?" in lines[0], done.stdout
    assert "main assistant: It ships tomorrow." in lines[1], done.stdout
    assert lines[-1] == "-- run uploaded-whole is finished"


def test_live_run_takes_the_metadata_agent_run_takes(server: ServerProcess) -> None:
    """A `BaseAgentRunMetadata` model, and Docent-style metadata carrying `scores`: the scores
    become the run's scores, the rest its metadata fields, as for a run uploaded whole."""
    with Client(server.url) as client:
        collection = client.create_collection("evals").collection
    writer = AgentRunWriter(collection.id, server_url=server.url)
    model = BaseAgentRunMetadata(scores={"reward": 1.0}, model="gpt-4o", task_id="t-1")
    with writer.live_run(agent_run_id="from-model", metadata=model) as run:
        run.append("main", [UserMessage(content="hi")])
    with writer.live_run(
        agent_run_id="docent-style", metadata={"scores": {"reward": 0}, "model": "gpt-4o"}
    ) as run:
        run.append("main", [UserMessage(content="hi")])
    summary = writer.finish()
    assert summary.ok, summary
    with Client(server.url) as client:
        stored = client.get_run("from-model")
        assert stored.metadata.scores == {"reward": 1.0}
        assert stored.metadata.model_dump()["model"] == "gpt-4o"
        assert stored.metadata.model_dump()["task_id"] == "t-1"
        docent = client.get_run("docent-style")
        assert docent.metadata.scores == {"reward": 0}
        assert docent.metadata.model_dump()["model"] == "gpt-4o"
        assert len(docent.transcripts["main"].messages) == 1


def test_a_refused_opening_event_fails_the_live_run_at_once(server: ServerProcess) -> None:
    """The opening event refused (an unknown collection here): the next append raises with
    the server's reason, rather than every later event being refused one by one."""
    writer = AgentRunWriter("no-such-collection", server_url=server.url)
    run = writer.live_run(agent_run_id="orphan")
    run.append("main", [UserMessage(content="first")])
    with pytest.raises(LiveRunError, match="no collection with id 'no-such-collection'"):
        for _ in range(200):  # until the refusal has come back
            run.append("main", [UserMessage(content="more")])
            time.sleep(0.02)
    summary = writer.finish()
    assert not summary.ok
    assert summary.events_refused[0].sequence == 1


def test_messages_appended_without_a_timestamp_get_the_time_of_append(
    server: ServerProcess,
) -> None:
    with Client(server.url) as client:
        collection = client.create_collection("evals").collection
    writer = AgentRunWriter(collection.id, server_url=server.url)
    given = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    before = datetime.now(UTC)
    with writer.live_run(agent_run_id="timed") as run:
        run.append(
            "main", [UserMessage(content="now"), UserMessage(content="then", timestamp=given)]
        )
    after = datetime.now(UTC)
    assert writer.finish().ok
    with Client(server.url) as client:
        now, then = client.get_run("timed").transcripts["main"].messages
    assert now.timestamp is not None and before <= now.timestamp <= after
    assert then.timestamp == given


def _wait_for_error(writer: AgentRunWriter) -> RpcError:
    # The first send answers it; 30 s leaves room for the writer's retries of a connection
    # refused at first (seen once in CI, against a server already SERVING: not understood yet).
    deadline = time.monotonic() + 30
    while writer.error is None:
        assert time.monotonic() < deadline, "the writer never learned of its refusal"
        time.sleep(0.02)
    return writer.error


def test_a_writer_to_an_unknown_collection_learns_at_its_first_send(
    server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    writer = AgentRunWriter("no-such-collection", server_url=server.url, flush_interval=0.05)
    writer.log_agent_runs([_tiny(i) for i in range(3)])
    error = _wait_for_error(writer)  # before finish()
    assert error.code == grpc.StatusCode.NOT_FOUND and "no-such-collection" in error.details
    assert "failed for good" in caplog.text  # logged at once
    with pytest.raises(RpcError, match="no run of it can be delivered"):
        writer.log_agent_runs([_tiny(3)])
    summary = writer.finish()
    assert summary.undelivered == 3 and not summary.ok


def test_a_writer_with_an_unknown_key_learns_at_its_first_send(tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "keys.db", None, "--auth", "keys") as keyed:
        writer = AgentRunWriter(
            "any", server_url=keyed.url, api_key="agr_not_a_key", flush_interval=0.05
        )
        writer.log_agent_runs([_tiny(0)])
        assert _wait_for_error(writer).code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(RpcError, match="UNAUTHENTICATED"):
            writer.log_agent_runs([_tiny(1)])
        writer.finish()


def _tiny(i: int) -> AgentRun:
    return AgentRun(
        id=f"tiny-{i}",
        transcripts={"t": Transcript(messages=[UserMessage(content="hi")])},
        metadata=BaseAgentRunMetadata(scores={}),
    )


def test_a_new_version_of_a_workflow_says_what_changed(
    server: ServerProcess, tmp_path: Path
) -> None:
    path = tmp_path / "grading.yaml"
    path.write_text(
        "name: grading\nstages:\n"
        "  - name: triage\n    pathways: {graded: audit}\n"
        "  - name: audit\n    pathways: {ok: review}\n    lease_seconds: 5m\n"
        "  - name: review\n    max_attempts: 7\n"
    )
    done = cli(server, "workflow", "apply", str(path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "workflow 'grading' applied (version 2): triage -> audit -> review"
    assert "  + stage 'audit'" in lines
    assert "  stage 'triage': pathways {'graded': 'review'} -> {'graded': 'audit'}" in lines
    assert "  stage 'review': max_attempts 4 -> 7" in lines, lines  # 4: the default
    again = cli(server, "workflow", "apply", str(path))
    assert again.stdout.splitlines() == [
        "workflow 'grading' unchanged (version 2): triage -> audit -> review"
    ]


def test_dropping_a_stage_that_holds_tasks_is_refused_unless_forced(
    server: ServerProcess, tmp_path: Path
) -> None:
    with Client(server.url) as client:
        collection = client.create_collection("evals", workflow="grading").collection
        writer = AgentRunWriter(collection.id, server_url=server.url)
        writer.log_agent_runs([_tiny(i) for i in range(4)])
        assert writer.finish().ok
        path = tmp_path / "grading.yaml"
        path.write_text("name: grading\nstages:\n  - name: review\n")
        refused = cli(server, "workflow", "apply", str(path))
        assert refused.returncode == 1 and refused.stdout == ""
        assert "drops stages that still hold ready or leased tasks: 'triage' (4)" in refused.stderr
        assert "--force" in refused.stderr
        assert len(client.list_tasks("grading", "triage", "ready")) == 4  # nothing changed
        forced = cli(server, "workflow", "apply", str(path), "--force")
        assert forced.returncode == 0, forced.stderr
        assert "  - stage 'triage'" in forced.stdout.splitlines()
        assert "  4 tasks of the dropped stages cancelled" in forced.stdout.splitlines()
        assert {t.state for t in client.list_tasks("grading")} == {TaskState.CANCELLED}
        assert [s.name for s in client.get_workflow("grading").stages] == ["review"]


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[ServerProcess, Authority]]:
    authority = Authority(tmp_path / "ca")
    issued = authority.issue("localhost", server=True)
    args = ("--tls-cert", str(issued.cert), "--tls-key", str(issued.key))
    trusted = grpc.ssl_channel_credentials(authority.cert.read_bytes())
    with ServerProcess(tmp_path / "tls.db", None, *args, health_credentials=trusted) as process:
        yield process, authority


def _stats(url: str, *flags: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "agentrun._cli", "stats", "--server", url, *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done, time.monotonic() - started


def test_a_tls_mismatch_names_its_cause_and_the_flag_that_fixes_it(
    tls_server: tuple[ServerProcess, Authority], server: ServerProcess
) -> None:
    """Not "is agentrun serve running there?" after the connect timeout: each mismatch is named
    at once with the flag that fixes it, and the fixed command works."""
    secure, authority = tls_server
    ca = str(authority.cert)
    cases = [
        (secure.url, (), f"speaks TLS and this client does not: use grpcs://{secure.url}"),
        (f"grpcs://{server.url}", (), "does not speak TLS (plaintext gRPC)"),
        (f"grpcs://{secure.url}", (), "is not signed by the system's CAs"),
        (
            f"grpcs://{secure.url}",
            ("--tls-ca", ca, "--tls-server-name", "agentrun.example"),
            "does not name 'agentrun.example'",
        ),
    ]
    for url, flags, said in cases:
        done, seconds = _stats(url, *flags)
        assert done.returncode == 1, (url, flags, done.stdout)
        assert said in done.stderr, (url, flags, done.stderr)
        assert "--tls" in done.stderr or "grpcs://" in done.stderr
        assert "is `agentrun serve` running" not in done.stderr
        assert seconds < 4, (url, flags, seconds)  # the connect timeout is 5 s
    fixed, _ = _stats(f"grpcs://{secure.url}", "--tls-ca", ca)
    assert fixed.returncode == 0 and fixed.stdout.startswith("collections:"), fixed.stderr


def test_a_file_uploaded_into_a_second_collection_says_where_its_runs_are(
    server: ServerProcess, tmp_path: Path
) -> None:
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(f"{_tiny(i).model_dump_json()}\n" for i in range(5)))
    first = cli(server, "upload", str(path), "--collection", "first")
    assert first.returncode == 0, first.stderr
    second = cli(server, "upload", str(path), "--collection", "second")
    assert second.returncode == 1 and second.stdout == ""
    (line,) = second.stderr.splitlines()  # one line, not a CONFLICT per run (twice)
    assert "is stored already, in collection 'first'" in line
    assert "agentrun enqueue first --workflow WORKFLOW" in line and "--new-ids" in line
    with Client(server.url) as client:
        assert "second" not in {c.name for c in client.list_collections()}  # none left behind
    copied = cli(server, "upload", str(path), "--collection", "second", "--new-ids")
    assert copied.returncode == 0, copied.stderr
    assert "5 stored, 0 duplicates" in copied.stdout
    again = cli(server, "upload", str(path), "--collection", "second", "--new-ids")
    assert "0 stored, 5 duplicates" in again.stdout  # the copies' ids are derived, not random
    with Client(server.url) as client:
        second_id = client.get_collection(name="second").id
        assert client.get_collection(second_id).run_count == 5
        assert client.get_collection(name="first").run_count == 5


def test_a_bad_line_is_named_once_with_its_column(server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    good = [_tiny(i).model_dump_json() for i in range(3)]
    path.write_text(f'{good[0]}\n{good[1]}\n{{"id": "x", "transcripts": [}}\n{good[2]}\nnope\n')
    done = cli(server, "upload", str(path), "--collection", "evals")
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert f"{path}: line 3, column 29: invalid JSON" in line and "--skip-invalid" in line
    skipping = cli(server, "upload", str(path), "--collection", "evals", "--skip-invalid")
    assert skipping.returncode == 0, skipping.stderr
    assert skipping.stdout.startswith("3 runs read (2 invalid skipped); 3 stored")
    assert [line.split(": ")[1] for line in skipping.stderr.splitlines()] == [
        f"skipped {path}",
        f"skipped {path}",
    ]
    assert "line 3, column 29" in skipping.stderr and "line 5, column 1" in skipping.stderr
