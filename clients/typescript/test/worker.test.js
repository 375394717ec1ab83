// The Worker (src/worker.js) against a live agentrun server: $AGENTRUN_SERVER names it (the
// Python suite's tests/e2e/test_typescript_client.py starts one and runs this); skipped when unset.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";

import { PermanentError, RetryLater, Worker, WorkProtocol, connect } from "../src/index.js";

const server = process.env.AGENTRUN_SERVER;

function run(id, messages) {
  const texts = Array.from({ length: messages }, (_, i) => ({
    content: { case: "text", value: `message ${i}` },
    role: { case: i % 2 ? "assistant" : "user", value: {} },
  }));
  return { id, transcripts: [{ key: "main", messages: texts }] };
}

async function setUp(stages) {
  const { ingestion, orchestrator } = connect(server);
  const name = `ts-worker-${randomUUID().slice(0, 8)}`;
  await orchestrator.applyWorkflow({ workflow: { name, stages } });
  const { collection } = await ingestion.createCollection({ name, workflow: name });
  return { name, collection, ingestion, orchestrator };
}

async function upload(ingestion, collection, runs) {
  async function* messages() {
    yield { collectionId: collection.id, agentRuns: runs };
  }
  const result = await ingestion.uploadAgentRuns(messages());
  assert.equal(result.acceptedCount, runs.length);
}

test("a Worker runs stage functions through two stages: outputs, dead letters, retries", { skip: !server }, async () => {
  const { name, collection, ingestion, orchestrator } = await setUp([
    { name: "grade", pathways: [{ name: "pass", nextStage: "report" }] },
    { name: "report" },
  ]);
  const runs = Array.from({ length: 20 }, (_, i) => run(`${name}-${i}`, 1 + (i % 5)));
  runs.push(run(`${name}-broken`, 1));
  await upload(ingestion, collection, runs);
  const seen = {};
  let retried = false;
  const worker = new Worker({
    workflow: name,
    serverUrl: server,
    credits: 4,
    exitWhenEmpty: true,
    stages: {
      grade: async (lease) => {
        if (lease.agentRun.id.endsWith("broken")) throw new PermanentError("this run cannot be graded");
        if (lease.agentRun.id.endsWith("-0") && !retried) {
          retried = true;
          throw new RetryLater(50); // handed back, no attempt spent
        }
        return { pathway: "pass", output: { messages: lease.agentRun.transcripts[0].messages.length } };
      },
      report: (lease, { input }) => {
        seen[lease.agentRun.id] = input;
      },
    },
  });
  const summary = await worker.run();
  assert.deepEqual(summary.completed, { grade: 20, report: 20 });
  assert.deepEqual(summary.dead, { grade: 1 });
  assert.deepEqual(summary.retried, { grade: 1 });
  for (const [i, r] of runs.slice(0, 20).entries()) assert.deepEqual(seen[r.id], { messages: 1 + (i % 5) });
  const { stages } = await orchestrator.getBacklog({ workflow: name });
  const byName = Object.fromEntries(stages.map((s) => [s.stage, s]));
  assert.equal(byName.grade.doneCount, 20n);
  assert.equal(byName.grade.deadCount, 1n);
  assert.equal(byName.report.doneCount, 20n);
  const { tasks } = await orchestrator.listTasks({ workflow: name, stage: "grade" });
  const first = tasks.find((t) => t.agentRunId === `${name}-0`);
  assert.equal(first.attempt, 1); // the RetryLater spent no attempt
});

test("draining a Worker settles what runs and hands back nothing unstarted", { skip: !server }, async () => {
  const { name, collection, ingestion, orchestrator } = await setUp([{ name: "slow" }]);
  await upload(ingestion, collection, Array.from({ length: 10 }, (_, i) => run(`${name}-${i}`, 1)));
  let started = 0;
  const worker = new Worker({
    workflow: name,
    serverUrl: server,
    credits: 3,
    stages: {
      slow: async () => {
        started += 1;
        if (started === 3) worker.drain(); // drain with three tasks under way
        await new Promise((resolve) => setTimeout(resolve, 100));
      },
    },
  });
  const summary = await worker.run();
  assert.equal(summary.completed.slow, 3);
  const { stages } = await orchestrator.getBacklog({ workflow: name });
  assert.equal(stages[0].doneCount, 3n);
  assert.equal(stages[0].readyCount, 7n); // nothing left leased: the rest wait for another worker
  assert.equal(stages[0].leasedCount, 0n);
});

test("the protocol batches settles one message per kind", () => {
  const protocol = new WorkProtocol("w", ["a"], 4);
  protocol.onSubscribed({ resumed: [] }, []);
  const deadline = { seconds: 130n, nanos: 0 };
  const lease = (n) => ({ taskId: `${n}`, leaseId: `L${n}`, stage: "a", deadline });
  protocol.onResponse({ kind: { case: "leases", value: { leases: [lease(1), lease(2), lease(3)] } } }, 100);
  const [one, two, three] = protocol.ready.splice(0);
  assert.ok(protocol.complete(one, "next") && protocol.complete(two, "next"));
  assert.ok(protocol.fail(three, "boom", false, 2));
  assert.ok(!protocol.complete(one, "again"));
  const written = protocol.outgoing(101);
  assert.deepEqual(written.map((m) => m.kind.case), ["completeTasks", "failTasks"]);
  assert.equal(written[0].kind.value.completions.length, 2);
  assert.equal(protocol.unsettled, 3);
  protocol.onResponse({ kind: { case: "acks", value: { acks: [{ taskId: "1", leaseId: "L1", code: 0 }, { taskId: "2", leaseId: "L2", code: 0 }] } } }, 101.5);
  protocol.onResponse({ kind: { case: "acks", value: { acks: [{ taskId: "3", leaseId: "L3", code: 0 }] } } }, 101.5);
  assert.equal(protocol.unsettled, 0);
});
