// Compile-only (`npm run typecheck`): the public surface as a TypeScript user writes against it.
import { create } from "@bufbuild/protobuf";
import {
  AgentRunSchema,
  type AgentRun,
  connect,
  RevokeReason,
  type WorkRequest,
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
