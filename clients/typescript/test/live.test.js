// The generated client against a live agentrun server: $AGENTRUN_SERVER names it (the Python
// suite's tests/e2e/test_typescript_client.py starts one and runs this); skipped when unset.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";

import { timestampFromDate } from "@bufbuild/protobuf/wkt";

import { AgentRunState, EventStatus, connect } from "../src/index.js";

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

test("a live run: events acknowledged in order, a resend is a duplicate, a watcher sees them", { skip: !server }, async () => {
  const { ingestion } = connect(server);
  const name = `ts-live-${randomUUID().slice(0, 8)}`;
  const { collection } = await ingestion.createCollection({ name });
  const madeAt = new Date("2026-12-01T04:30:15.123Z");
  const message = (role, text) => ({
    content: { case: "text", value: text },
    role: { case: role, value: {} },
    timestamp: timestampFromDate(madeAt),
  });
  const event = (sequence, patch, finish = false) => ({
    agentRunId: name,
    sequence: BigInt(sequence),
    collectionId: collection.id,
    patch,
    finish,
  });

  // One long-lived stream carries the run's events; each message gets its acks, in order.
  const out = channel();
  const acks = ingestion.streamAgentRunEvents(out)[Symbol.asyncIterator]();
  const send = async (...events) => {
    out.push({ events });
    return (await acks.next()).value.acks;
  };
  const opened = await send(
    event(1, { name: "task-17", transcripts: [{ key: "main", messages: [message("user", "2+2?")] }] }),
  );
  assert.deepEqual(opened.map((a) => a.status), [EventStatus.STORED]);
  const watcher = ingestion.watchAgentRun({ agentRunId: name });
  const answered = await send(
    event(2, { transcripts: [{ key: "main", messages: [message("assistant", "4")] }] }),
    event(2, { transcripts: [{ key: "main", messages: [message("assistant", "4")] }] }), // a resend
    event(4, {}), // a gap: refused, naming the number expected
  );
  assert.deepEqual(
    answered.map((a) => a.status),
    [EventStatus.STORED, EventStatus.DUPLICATE, EventStatus.REFUSED],
  );
  assert.equal(answered[2].code, 9); // FAILED_PRECONDITION
  assert.equal(answered[2].nextSequence, 3n);
  const running = await ingestion.getAgentRun({ agentRunId: name });
  assert.equal(running.agentRun.state, AgentRunState.RUNNING);
  assert.equal(running.agentRun.eventCount, 2n);
  await send(event(3, { scores: { reward: { kind: { case: "doubleValue", value: 1 } } } }, true));
  out.close();

  const seen = [];
  for await (const response of watcher) {
    seen.push(...response.events.map((e) => e.sequence));
    if (response.state === AgentRunState.FINISHED) break;
  }
  assert.deepEqual(seen, [1n, 2n, 3n]);
  const done = (await ingestion.getAgentRun({ agentRunId: name })).agentRun;
  assert.equal(done.state, AgentRunState.FINISHED);
  const texts = done.agentRun.transcripts[0].messages.map((m) => m.content.value);
  assert.deepEqual(texts, ["2+2?", "4"]);
  assert.equal(done.agentRun.transcripts[0].messages[1].timestamp.nanos, 123_000_000);
});
