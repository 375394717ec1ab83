"""The web console (issue 27) in a real browser against a real server process: from home to a
real run's transcript, a live run growing on its page, dead letters redriven with a click and a
confirmation, keys' scopes and limits, and hostile run content that stays text."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from agentrun import (
    AgentRunWriter,
    Client,
    Fail,
    Runner,
    StageResult,
    TaskContext,
    TaskState,
    load_agent_runs,
)
from agentrun.chat import AssistantMessage, UserMessage
from agentrun.v1 import workflow_pb2

from ..processes import ServerProcess, free_port

LIVE_MS = 10_000
"""How long a live event may take to show. The server sends it within ~60 ms of its append
(measured); a headless browser on a loaded 2-core machine showed it up to 3.4 s later, so the
3 s this was failed CI (on code before and after issue 29's changes alike)."""


class Console:
    def __init__(self, server: ServerProcess, web_port: int) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{web_port}"


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    web_port = free_port()
    with ServerProcess(tmp_path / "agentrun.db", None, "--web-port", str(web_port)) as s:
        yield Console(s, web_port)


def _grading(client: Client, max_attempts: int = 1) -> None:
    client.apply_workflow(
        workflow_pb2.Workflow(
            name="grading",
            stages=[
                workflow_pb2.Stage(
                    name="grade",
                    pathways=[workflow_pb2.Pathway(name="graded")],
                    retry_policy=workflow_pb2.RetryPolicy(max_attempts=max_attempts),
                )
            ],
        )
    )


def _fail_some(url: str, failing: set[str], api_key: str | None = None) -> None:
    """Run the grading stage once over every ready task: the runs in `failing` die. (In a thread
    of its own: Playwright's sync API holds this one's event loop.)"""
    with ThreadPoolExecutor(1) as thread:
        thread.submit(_grade, url, failing, api_key).result(timeout=60)


def _grade(url: str, failing: set[str], api_key: str | None) -> None:
    runner = Runner(workflow="grading", server_url=url, api_key=api_key, worker="grader@test-host")

    @runner.stage("grade")
    def grade(task: TaskContext) -> object:
        if task.agent_run_id in failing:
            return Fail(f"grader crashed on {task.agent_run_id}: HTTP 502 from the judge")
        return StageResult("graded", {"ok": True})

    runner(progress=False)


def test_home_to_collection_to_run_shows_a_real_transcript(
    console: Console, page: Page, tau_bench_path: Path
) -> None:
    runs = load_agent_runs(tau_bench_path)[:5]
    with Client(console.server.url) as client:
        collection = client.create_collection("airline").collection
    writer = AgentRunWriter(collection.id, server_url=console.server.url)
    writer.log_agent_runs(runs)
    writer.finish()
    run = runs[0]
    page.goto(console.url + "/")
    page.get_by_role("link", name="airline").click()
    expect(page.locator("#runs tbody tr")).to_have_count(5)
    page.get_by_role("link", name=run.name or run.id).first.click()
    transcript = next(iter(run.transcripts.values()))
    first_user = next(m for m in transcript.messages if m.role == "user")
    expect(page.locator(".msg.user").first).to_contain_text(first_user.text[:80])
    calls = [c for m in transcript.messages if m.role == "assistant" for c in m.tool_calls or []]
    assert calls, "the real run makes tool calls"
    expect(page.locator(".call .fn").first).to_have_text(calls[0].function)
    shown = page.locator(".msg").count()
    assert shown == sum(len(t.messages) for t in run.transcripts.values())
    assert run.metadata.scores == {"reward": 0.0}
    expect(page.locator("#scores")).to_contain_text("reward")
    # The collection's filter box: the run's score, and a malformed filter named.
    page.goto(f"{console.url}/collections/airline?where=scores.reward+%3C+1")
    expect(page.locator("#runs")).to_contain_text(run.name or run.id)
    page.goto(f"{console.url}/collections/airline?where=reward+%7E+1")
    expect(page.locator("#problem")).to_contain_text("write FIELD OP VALUE")


def test_a_live_run_grows_on_its_page_without_a_reload(console: Console, page: Page) -> None:
    with Client(console.server.url) as client:
        collection = client.create_collection("live").collection
    writer = AgentRunWriter(collection.id, server_url=console.server.url)
    with writer.live_run(name="growing") as run:
        run.append("main", [UserMessage(content="first question")])
        writer._events.flush(10)  # type: ignore[union-attr]
        page.goto(console.url + "/")  # the home page counts it running, linking to it
        expect(page.locator("#collections a[href='/collections/live?state=running']")).to_have_text(
            "1"
        )
        page.goto(f"{console.url}/runs/{run.agent_run_id}")
        expect(page.locator("#run-state")).to_have_text("running")
        expect(page.locator(".msg")).to_have_count(1)
        page.wait_for_timeout(300)  # the event stream is open
        # Pushed, not fetched: after the append the page asks for nothing but its event stream
        # (a reconnect of it at most; a browser's late favicon request aside), so the message
        # came over the stream already open. (Not a time bound: a headless browser on a loaded
        # CI machine drew it seconds late.)
        asked: list[str] = []
        page.on("request", lambda request: asked.append(request.url))
        run.append("main", [AssistantMessage(content="an answer that arrives later")])
        expect(page.get_by_text("an answer that arrives later")).to_be_visible(timeout=LIVE_MS)
        assert [url for url in asked if "/live/" not in url and "/favicon" not in url] == []
        run.append("second", [UserMessage(content="a new transcript")])
        expect(page.get_by_text("a new transcript")).to_be_visible(timeout=LIVE_MS)
    writer.finish()
    expect(page.locator("#run-state")).to_have_text("finished", timeout=LIVE_MS)
    assert page.locator(".msg").count() == 3
    page.reload()
    assert page.locator(".msg").count() == 3


def _read_to_the_end(page: Page, messages: int) -> None:
    """Scroll down as a reader would until the page shows `messages` messages."""
    for _ in range(40):
        if page.locator(".msg").count() >= messages:
            break
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        page.wait_for_timeout(150)
    expect(page.locator(".msg")).to_have_count(messages)


def test_a_long_transcript_shows_its_first_messages_and_loads_the_rest_as_it_is_read(
    console: Console, page: Page
) -> None:
    with Client(console.server.url) as client:
        collection = client.create_collection("long").collection
    writer = AgentRunWriter(collection.id, server_url=console.server.url)
    with writer.live_run("long-run") as run:
        run.append("main", [UserMessage(content=f"message {i}") for i in range(450)])
    writer.finish()
    page.goto(f"{console.url}/runs/long-run")
    expect(page.locator(".msg")).to_have_count(100)
    expect(page.locator(".more")).to_have_text("350 more messages")
    _read_to_the_end(page, 450)
    assert page.locator(".more").count() == 0
    texts = page.locator(".msg pre").all_text_contents()
    assert texts == [f"message {i}" for i in range(450)]  # each once, in order


def test_a_run_over_the_message_limit_reads_by_its_events_then_goes_on_live(
    tmp_path: Path, page: Page
) -> None:
    web_port = free_port()
    with ServerProcess(
        tmp_path / "agentrun.db",
        None,
        "--web-port",
        str(web_port),
        "--max-message-bytes",
        "1048576",
    ) as server:
        with Client(server.url) as client:
            collection = client.create_collection("big").collection
        writer = AgentRunWriter(collection.id, server_url=server.url)
        with writer.live_run("big-run", name="over a megabyte") as run:
            for event in range(12):
                key = "main" if event != 6 else "side"
                text = "x" * 5000
                run.append(key, [UserMessage(content=f"{event}.{i} {text}") for i in range(50)])
                writer._events.flush(10)  # type: ignore[union-attr]
            with (
                Client(server.url) as client,
                pytest.raises(Exception, match="over the 1,048,576-byte message limit"),
            ):
                client.get_run("big-run")  # GetAgentRun cannot answer it whole
            page.goto(f"http://127.0.0.1:{web_port}/runs/big-run")
            expect(page.locator("h1")).to_have_text("over a megabyte")
            expect(page.locator(".msg")).to_have_count(100)  # its first two events
            # Its summary follows: state and counts, the collection in the breadcrumbs.
            expect(page.locator("#run-head")).to_contain_text("running")
            expect(page.locator("#run-head")).to_contain_text("600 messages")
            expect(page.locator("#crumbs")).to_contain_text("big")
            _read_to_the_end(page, 600)
            main = page.locator("#transcripts > section").nth(0).locator(".msg > pre")
            side = page.locator("#transcripts > section").nth(1).locator(".msg > pre")
            expected = [f"{e}.{i}" for e in range(12) if e != 6 for i in range(50)]
            assert [t.split(" ")[0] for t in main.all_text_contents()] == expected
            assert [t.split(" ")[0] for t in side.all_text_contents()] == [
                f"6.{i}" for i in range(50)
            ]
            run.append("main", [UserMessage(content="after the history, live")])
            expect(page.get_by_text("after the history, live")).to_be_visible(timeout=LIVE_MS)
        writer.finish()
        expect(page.locator("#run-state")).to_have_text("finished", timeout=LIVE_MS)


def test_dead_tasks_are_listed_with_their_error_and_redriven_with_a_confirmation(
    console: Console, page: Page
) -> None:
    with Client(console.server.url) as client:
        _grading(client)
        collection = client.create_collection("graded", workflow="grading").collection
    writer = AgentRunWriter(collection.id, server_url=console.server.url)
    for i in range(3):
        with writer.live_run(f"run-{i}") as run:
            run.append("main", [UserMessage(content=f"q{i}")])
    writer.finish()
    _fail_some(console.server.url, {"run-1", "run-2"})
    page.goto(console.url + "/workflows/grading")
    dead = page.locator("#dead tbody tr")
    expect(dead).to_have_count(2)
    expect(page.locator("#dead")).to_contain_text(
        "grader crashed on run-1: HTTP 502 from the judge"
    )
    expect(page.locator("#graph")).to_contain_text("grade")
    confirmations: list[str] = []

    def accept(dialog: object) -> None:
        confirmations.append(dialog.message)  # type: ignore[attr-defined]
        dialog.accept()  # type: ignore[attr-defined]

    page.on("dialog", accept)
    page.locator("#dead tbody tr", has_text="run-1").locator("input[type=checkbox]").check()
    page.locator("#redrive-selected").click()
    expect(page.locator("#done")).to_have_text("1 task redriven")
    assert len(confirmations) == 1 and "Redrive the selected" in confirmations[0]
    with Client(console.server.url) as client:
        ready = client.list_tasks("grading", "grade", TaskState.READY)
        dead_now = client.list_tasks("grading", "grade", TaskState.DEAD)
    assert [t.agent_run_id for t in ready] == ["run-1"]
    assert [t.agent_run_id for t in dead_now] == ["run-2"]
    expect(page.locator("#dead tbody tr")).to_have_count(1)
    # A dismissed confirmation does nothing.
    page.remove_listener("dialog", accept)
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.locator("#dead tbody tr").locator("input[type=checkbox]").check()
    page.locator("#redrive-selected").click()
    page.wait_for_timeout(500)
    with Client(console.server.url) as client:
        assert len(client.list_tasks("grading", "grade", TaskState.DEAD)) == 1
    # The run's page shows its way through the workflow, with the failed attempt.
    page.goto(f"{console.url}/runs/run-2")
    expect(page.locator("#run-tasks")).to_contain_text("dead")
    expect(page.locator("#run-tasks")).to_contain_text("grader crashed on run-2")
    # The task's page names who held each attempt's lease.
    (task,) = dead_now
    page.goto(f"{console.url}/tasks/{task.id}")
    failed = page.locator("#attempts tbody tr").nth(0)
    expect(failed.locator(".holder")).to_have_text("grader@test-host")
    expect(failed).to_contain_text("grader crashed on run-2")


def test_hostile_run_content_renders_as_text_and_runs_nothing(console: Console, page: Page) -> None:
    hostile = [
        "<script>window.__pwned = 'script'</script>",
        "<img src=x onerror=\"window.__pwned = 'img'\">",
        "[click me](javascript:window.__pwned='link') <a href=\"javascript:window.__pwned='a'\">a</a>",
        "\x1b[31mred alert\x1b[0m and a bell\x07",
    ]
    with Client(console.server.url) as client:
        collection = client.create_collection("<b>hostile</b>").collection
    writer = AgentRunWriter(collection.id, server_url=console.server.url)
    with writer.live_run("hostile-run", name="<script>window.__pwned='name'</script>") as run:
        run.append("main", [UserMessage(content=text) for text in hostile])
        run.append("<img src=x onerror=\"window.__pwned='key'\">", [UserMessage(content="x")])
        run.update_metadata(note="<svg onload=\"window.__pwned='meta'\">")
    writer.finish()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(console.url + "/")
    page.get_by_role("link", name="<b>hostile</b>").click()
    page.get_by_role("link", name="<script>window.__pwned='name'</script>").click()
    expect(page.locator(".msg")).to_have_count(5)
    messages = page.locator(".msg > pre")
    expect(messages.nth(0)).to_be_visible()  # shown to the reader, as text
    assert messages.nth(0).text_content() == hostile[0]
    assert messages.nth(1).text_content() == hostile[1]
    assert messages.nth(2).text_content() == hostile[2]
    assert messages.nth(3).text_content() == "␛[31mred alert␛[0m and a bell␇"
    assert page.evaluate("window.__pwned") is None
    assert (
        page.locator("main img, main script, main svg[onload], main a[href^=javascript]").count()
        == 0
    )
    assert page.locator("#metadata").inner_text().count("<svg onload=") == 1
    assert not errors, errors


# --- keys ---------------------------------------------------------------------------------------


def _keys(tmp_path: Path) -> dict[str, str]:
    """Keys made with the CLI on the database before the server starts: name -> token."""
    import subprocess
    import sys

    db = f"sqlite:///{tmp_path / 'agentrun.db'}"
    made = {}
    for name, args in (
        ("admin", ["--scope", "admin"]),
        ("reader", ["--scope", "read"]),
        ("only-a", ["--scope", "read", "--scope", "work", "--collection", "team-a"]),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "agentrun._cli", "keys", "create", name, *args, "--db", db],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        made[name] = out.strip().splitlines()[-1]
    return made


def _sign_in(page: Page, url: str, token: str) -> None:
    page.goto(url + "/")
    expect(page.locator("form.login")).to_be_visible()
    page.locator("input[name=api_key]").fill(token)
    page.get_by_role("button", name="Sign in").click()


def test_with_keys_the_console_asks_for_one_and_obeys_its_scopes_and_limits(
    tmp_path: Path, page: Page
) -> None:
    keys = _keys(tmp_path)
    web_port = free_port()
    with ServerProcess(
        tmp_path / "agentrun.db", None, "--auth", "keys", "--web-port", str(web_port)
    ) as server:
        url = f"http://127.0.0.1:{web_port}"
        with Client(server.url, api_key=keys["admin"]) as client:
            _grading(client)
            a = client.create_collection("team-a", workflow="grading").collection
            client.create_collection("team-b")
        writer = AgentRunWriter(a.id, server_url=server.url, api_key=keys["admin"])
        with writer.live_run("a-run") as run:
            run.append("main", [UserMessage(content="hello")])
        writer.finish()
        _fail_some(server.url, {"a-run"}, api_key=keys["admin"])

        # No key: every page leads to the form; a wrong key is refused, saying why.
        page.goto(url + "/workflows/grading")
        expect(page.locator("form.login")).to_be_visible()
        page.locator("input[name=api_key]").fill("ar_not_a_key")
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#problem")).to_contain_text("unknown or revoked")

        # A read-only key sees the dead letter but has no button, and a forged POST is refused.
        page.locator("input[name=api_key]").fill(keys["reader"])
        page.get_by_role("button", name="Sign in").click()
        expect(page).to_have_url(url + "/workflows/grading")
        expect(page.locator("#dead tbody tr")).to_have_count(1)
        assert page.locator("#redrive-selected").count() == 0
        csrf = page.locator("#dead-form input[name=csrf]").input_value()
        forged = page.request.post(
            url + "/workflows/grading/redrive",
            form={"csrf": csrf, "task_id": page.locator("#dead input[name=task_id]").input_value()},
        )
        assert forged.status == 403 and "needs scope" in forged.text()
        # ... and without the CSRF token, even the right key's POST is refused.
        assert (
            page.request.post(url + "/workflows/grading/redrive", form={"task_id": "1"}).status
            == 403
        )
        page.get_by_role("button", name="Sign out").click()

        # A key limited to team-a sees only team-a.
        _sign_in(page, url, keys["only-a"])
        expect(page.locator("#collections tbody tr")).to_have_count(1)
        expect(page.locator("#collections")).to_contain_text("team-a")
        page.goto(url + "/collections/team-b")
        expect(page.locator("#problem")).to_contain_text("outside")
        page.get_by_role("button", name="Sign out").click()
        page.goto(url + "/")
        expect(page.locator("form.login")).to_be_visible()
