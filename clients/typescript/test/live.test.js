// The generated client against a live agentrun server: $AGENTRUN_SERVER names it (the Python
// suite's tests/e2e/test_typescript_client.py starts one and runs this); skipped when unset.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";

import { connect } from "../src/index.js";

const server = process.env.AGENTRUN_SERVER;

function run(id, reward) {
  return {
    id,
    transcripts: [
      {
        key: "main",
        messages: [
          { content: { case: "text", value: "What is 2 + 2?" }, role: { case: "user", value: {} } },
          { content: { case: "text", value: "4" }, role: { case: "assistant", value: {} } },
        ],
      },
    ],
    scores: { reward: { kind: { case: "doubleValue", value: reward } } },
  };
}

/** An async iterable fed by hand: the request side of a bidi stream. */
function channel() {
  const queue = [];
  let wake = null;
  let closed = false;
  return {
    push(item) {
      queue.push(item);
      wake?.();
    },
    close() {
      closed = true;
      wake?.();
    },
    async *[Symbol.asyncIterator]() {
      for (;;) {
        if (queue.length) yield queue.shift();
        else if (closed) return;
        else await new Promise((resolve) => (wake = resolve));
      }
    },
  };
}

test("upload runs with partial success, then work them through two stages", { skip: !server }, async () => {
  const { ingestion, orchestrator } = connect(server);
  const name = `ts-${randomUUID().slice(0, 8)}`;
  await orchestrator.applyWorkflow({
    workflow: {
      name,
      stages: [
        { name: "grade", pathways: [{ name: "pass", nextStage: "report" }] },
        { name: "report" },
      ],
    },
  });
  const { collection } = await ingestion.createCollection({ name, workflow: name });

  // Client streaming; one bad run (no transcripts) is rejected by index, the others land.
  async function* requests() {
    yield { collectionId: collection.id, agentRuns: [run(`${name}-a`, 1), run(`${name}-b`, 0)] };
    yield { collectionId: collection.id, agentRuns: [{ id: `${name}-bad` }] };
  }
  const uploaded = await ingestion.uploadAgentRuns(requests());
  assert.equal(uploaded.acceptedCount, 2);
  assert.equal(uploaded.rejected.length, 1);
  assert.equal(uploaded.rejected[0].index, 2);
  assert.equal(uploaded.rejected[0].agentRunId, `${name}-bad`);

  // Bidi streaming: take leases, complete each with its pathway, until the stages are empty.
  const out = channel();
  out.push({
    kind: {
      case: "subscribe",
      value: {
        workflow: name,
        stages: [{ stage: "grade" }, { stage: "report" }],
        credits: 4,
        notifyWhenEmpty: true,
      },
    },
  });
  const completed = { grade: [], report: [] };
  for await (const response of orchestrator.work(out)) {
    const { case: kind, value } = response.kind;
    if (kind === "leases") {
      for (const lease of value.leases) completed[lease.stage].push(lease.agentRun.id);
      out.push({
        kind: {
          case: "completeTasks",
          value: {
            completions: value.leases.map((lease) => ({
              taskId: lease.taskId,
              leaseId: lease.leaseId,
              pathway: lease.stage === "grade" ? "pass" : "",
            })),
          },
        },
      });
    } else if (kind === "acks") {
      for (const ack of value.acks) assert.equal(ack.code, 0, ack.message);
    } else if (kind === "stagesEmpty") {
      out.close();
    }
  }
  const runs = [`${name}-a`, `${name}-b`];
  assert.deepEqual(completed.grade.sort(), runs);
  assert.deepEqual(completed.report.sort(), runs);

  const { stages } = await orchestrator.getBacklog({ workflow: name });
  const done = Object.fromEntries(stages.map((s) => [s.stage, Number(s.doneCount)]));
  assert.deepEqual(done, { grade: 2, report: 2 });
});

test("a call naming a missing workflow fails with NOT_FOUND and its message", { skip: !server }, async () => {
  const { orchestrator } = connect(server);
  await assert.rejects(orchestrator.getWorkflow({ name: "no-such-workflow" }), (error) => {
    assert.equal(error.code, 5); // Code.NotFound
    assert.match(error.rawMessage, /no-such-workflow/);
    return true;
  });
});
