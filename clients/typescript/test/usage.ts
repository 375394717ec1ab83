// Compile-only (`npm run typecheck`): the public surface as a TypeScript user writes against it.
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  AgentRunSchema,
  type AgentRun,
  connect,
  EventStatus,
  RevokeReason,
  type StreamAgentRunEventsRequest,
  StreamAgentRunEventsRequestSchema,
  type WorkRequest,
  PermanentError,
  RetryLater,
  Worker,
  type WorkerSummary,
} from "../src/index.js";

const run: AgentRun = create(AgentRunSchema, {
  id: "r1",
  transcripts: [
    {
      key: "main",
      messages: [{ content: { case: "text", value: "hi" }, role: { case: "user", value: {} } }],
    },
  ],
  scores: { reward: { kind: { case: "doubleValue", value: 1 } } },
});

export async function example(requests: AsyncIterable<WorkRequest>): Promise<number> {
  const { ingestion, orchestrator } = connect("127.0.0.1:50051", { apiKey: "k" });
  async function* batches() {
    yield { collectionId: "c", agentRuns: [run] };
  }
  const uploaded = await ingestion.uploadAgentRuns(batches());
  let revoked = 0;
  for await (const response of orchestrator.work(requests)) {
    if (response.kind.case === "revoked") {
      revoked += response.kind.value.leases.filter(
        (lease) => lease.reason === RevokeReason.CANCELLED,
      ).length;
    }
  }
  return uploaded.acceptedCount + revoked;
}

// A live run: events on one long-lived stream, each acknowledged once durable.
export async function liveRun(): Promise<bigint> {
  const { ingestion } = connect();
  async function* events(): AsyncIterable<StreamAgentRunEventsRequest> {
    yield create(StreamAgentRunEventsRequestSchema, {
      events: [
        {
          agentRunId: "r2",
          sequence: 1n,
          collectionId: "c",
          patch: {
            transcripts: [
              {
                key: "main",
                messages: [
                  {
                    content: { case: "text", value: "step 1" },
                    role: { case: "assistant", value: {} },
                    timestamp: timestampFromDate(new Date()),
                  },
                ],
              },
            ],
          },
        },
      ],
    });
  }
  let next = 0n;
  for await (const response of ingestion.streamAgentRunEvents(events())) {
    for (const ack of response.acks) {
      if (ack.status !== EventStatus.REFUSED) next = ack.nextSequence;
    }
  }
  return next;
}

// A stage worker: stage functions, not protocol code.
export async function work(server: string, stop: AbortSignal): Promise<number> {
  const worker = new Worker({
    workflow: "grading",
    serverUrl: server,
    credits: 8,
    stages: {
      triage: async (lease, { signal }) => {
        if (signal.aborted) throw new PermanentError("revoked");
        if (lease.attempt > 2) throw new RetryLater(1000);
        return { pathway: "solved", output: { messages: lease.agentRun?.transcripts.length ?? 0 } };
      },
      review: (_lease, { input }) => (input === null ? "" : undefined),
    },
  });
  stop.addEventListener("abort", () => worker.drain()); // say, on SIGTERM
  const summary: WorkerSummary = await worker.run();
  return summary.completed["triage"] ?? 0;
}
