"""The console's pure parts: what a page makes of run content, a workflow's graph, sessions."""

from __future__ import annotations

from agentrun.v1 import agent_run_pb2 as run_pb
from agentrun.v1 import workflow_pb2 as wf
from agentrun_server.web import _sessions, _views


def test_control_characters_show_as_their_symbols_and_text_stays_text() -> None:
    assert _views.visible("\x1b[31mred\x1b[0m\tand\nbell\x07\x7f") == ("␛[31mred␛[0m\tand\nbell␇␡")
    assert _views.visible("<script>") == "<script>"  # escaping is the template's job


def test_an_events_patches_fold_as_the_server_folds_them() -> None:
    run = run_pb.AgentRun()
    first = run_pb.AgentRun(name="a")
    first.transcripts.add(key="main").messages.add(text="one")
    first.scores["r"].double_value = 0.5
    second = run_pb.AgentRun()
    second.transcripts.add(key="main").messages.add(text="two")
    second.transcripts.add(key="side", name="helper").messages.add(text="three")
    second.scores["r"].double_value = 1.0
    assert _views.merge(run, first) == 1 and _views.merge(run, second) == 2
    assert [(t.key, [m.text for m in t.messages]) for t in run.transcripts] == [
        ("main", ["one", "two"]),
        ("side", ["three"]),
    ]
    assert run.name == "a" and run.scores["r"].double_value == 1.0
    assert run.transcripts[1].name == "helper"


def test_a_transcript_page_counts_only_what_the_page_was_drawn_with() -> None:
    t = run_pb.Transcript(key="k")
    for i in range(10):
        t.messages.add(text=str(i))
    page = _views.transcript(t, 4, 3, until=8)
    assert [p.text for m in page.messages for p in m.parts] == ["4", "5", "6"]
    assert (page.total, page.more) == (8, 1)
    assert _views.transcript(t, 6, 3, until=8).more == 0


def test_stages_stand_in_columns_by_distance_and_pathways_to_one_stage_share_an_edge() -> None:
    workflow = wf.Workflow(
        name="w",
        stages=[
            wf.Stage(
                name="triage",
                pathways=[
                    wf.Pathway(name="solved", next_stage="review"),
                    wf.Pathway(name="failed", next_stage="review"),
                    wf.Pathway(name="skip"),
                ],
            ),
            wf.Stage(name="review", pathways=[wf.Pathway(name="again", next_stage="triage")]),
            wf.Stage(name="orphan"),
        ],
    )
    graph = _views.graph(workflow, {"review": {"dead": 2}})
    x = {n.name: n.x for n in graph.nodes}
    assert x["triage"] < x["review"] < x["orphan"]
    assert [(e.label, e.x1 < e.x2) for e in graph.edges] == [
        ("solved, failed", True),
        ("again", False),
    ]
    assert next(n for n in graph.nodes if n.name == "review").counts == {"dead": 2}
    assert list(_views.pathway_ends(workflow)) == [("triage", "skip")]


def test_a_flood_of_sessions_evicts_those_without_a_key_first(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(_sessions, "MAX_SESSIONS", 20)
    sessions = _sessions.Sessions()
    signed_in = sessions.new()
    signed_in.token = "ar_key"
    for _ in range(100):
        sessions.new()
    assert sessions.get(signed_in.id) is signed_in
    renewed = sessions.renew(signed_in)
    assert sessions.get(signed_in.id) is None and sessions.get(renewed.id).token == "ar_key"  # type: ignore[union-attr]
