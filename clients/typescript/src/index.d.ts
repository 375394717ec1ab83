import type { Client } from "@connectrpc/connect";
import type { IngestionService } from "./gen/agentrun/v1/ingestion_service_pb.js";
import type { OrchestratorService } from "./gen/agentrun/v1/orchestrator_service_pb.js";

export { create, fromBinary, toBinary } from "@bufbuild/protobuf";
export * from "./gen/agentrun/v1/agent_run_pb.js";
export * from "./gen/agentrun/v1/ingestion_service_pb.js";
export * from "./gen/agentrun/v1/orchestrator_service_pb.js";
export * from "./gen/agentrun/v1/workflow_pb.js";

/** `host:port` (plaintext), `http://...` or `https://...` as a base URL. */
export declare function baseUrl(serverUrl?: string): string;

/** Clients of both services sharing one HTTP/2 connection. */
export declare function connect(
  serverUrl?: string,
  options?: { apiKey?: string },
): {
  ingestion: Client<typeof IngestionService>;
  orchestrator: Client<typeof OrchestratorService>;
};
