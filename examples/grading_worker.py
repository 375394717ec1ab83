"""A stage worker for examples/grading.yaml: triage by reward, then a final review.

    python examples/grading_worker.py [--server HOST:PORT] [--help]

Exits once the stages are empty (pass --refresh-every N to keep serving).
"""

from __future__ import annotations

from agentrun import AgentRun, Runner
from agentrun.chat import AssistantMessage

runner = Runner(workflow="grading")


@runner.stage("triage")
def triage(run: AgentRun) -> str:
    """Route by the run's reward score."""
    reward = run.metadata.scores.get("reward") or 0
    return "solved" if reward > 0 else "failed"


@runner.stage("review")
def review(run: AgentRun) -> None:
    """The final stage: look at the run (here, count tool calls) and end its workflow."""
    calls = sum(
        len(m.tool_calls or ())
        for t in run.transcripts.values()
        for m in t.messages
        if isinstance(m, AssistantMessage)
    )
    assert calls >= 0
    return None


if __name__ == "__main__":
    runner.run()
