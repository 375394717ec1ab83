"""A stage worker for examples/grading.yaml: triage by reward, then a review of what triage found.

    python examples/grading_worker.py [--server HOST:PORT] [--help]

Exits once the stages are empty (pass --refresh-every N to keep serving).
"""

from __future__ import annotations

from agentrun import AgentRun, Runner, StageResult, TaskContext
from agentrun.chat import AssistantMessage

runner = Runner(workflow="grading")


@runner.stage("triage")
def triage(run: AgentRun) -> StageResult:
    """Route by the run's reward; hand what was counted on to the review as its input."""
    reward = run.metadata.scores.get("reward") or 0
    calls = sum(
        len(m.tool_calls or ())
        for t in run.transcripts.values()
        for m in t.messages
        if isinstance(m, AssistantMessage)
    )
    found = {"reward": reward, "tool_calls": calls, "transcripts": len(run.transcripts)}
    return StageResult("solved" if reward > 0 else "failed", output=found)


@runner.stage("review")
def review(task: TaskContext) -> StageResult:
    """The final stage needs only what triage found (so the run is not even built), and ends the
    run's pass through the workflow with a verdict stored on its task."""
    found = task.input or {}
    verdict = "ok" if found.get("reward") else "needs a human look"
    return StageResult(None, output={**found, "verdict": verdict})


if __name__ == "__main__":
    runner.run()
