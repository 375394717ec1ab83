import type { Client } from "@connectrpc/connect";
import type { IngestionService } from "./gen/agentrun/v1/ingestion_service_pb.js";
import type { KeyService } from "./gen/agentrun/v1/key_service_pb.js";
import type { OrchestratorService } from "./gen/agentrun/v1/orchestrator_service_pb.js";

export { create, fromBinary, toBinary } from "@bufbuild/protobuf";
export * from "./gen/agentrun/v1/agent_run_pb.js";
export * from "./gen/agentrun/v1/ingestion_service_pb.js";
export * from "./gen/agentrun/v1/key_service_pb.js";
export * from "./gen/agentrun/v1/orchestrator_service_pb.js";
export * from "./gen/agentrun/v1/workflow_pb.js";
/** The limits a request must keep (generated from the server's own, `make gen`). */
export * as limits from "./limits.js";

/** `host:port` (plaintext), `grpc://`, `grpcs://`, `http://` or `https://...` as a base URL. */
export declare function baseUrl(serverUrl?: string): string;

/** Whether a `host:port` is this machine's (loopback). */
export declare function isLoopback(hostPort: string): boolean;

/** How to reach the server, as the Python SDK's `Connection`; each option defaults to its
 * AGENTRUN_* environment variable. */
export interface ConnectOptions {
  /** Sent as `authorization: Bearer <key>` ($AGENTRUN_API_KEY). */
  apiKey?: string;
  /** Force TLS on or off ($AGENTRUN_TLS); by default on for grpcs:// or https://, a CA or a
   * client certificate, or an API key sent to another machine. */
  tls?: boolean;
  /** CA bundle: PEM text or buffer, or a file path ($AGENTRUN_TLS_CA). */
  tlsCa?: string | Uint8Array;
  /** Client certificate for mTLS ($AGENTRUN_TLS_CERT). */
  tlsCert?: string | Uint8Array;
  /** The client certificate's key ($AGENTRUN_TLS_KEY). */
  tlsKey?: string | Uint8Array;
  /** Name to verify the server certificate against ($AGENTRUN_TLS_SERVER_NAME). */
  tlsServerName?: string;
  /** Extra headers sent with every call. */
  metadata?: Record<string, string>;
  /** Send an API key without TLS to another machine. */
  allowPlaintextKey?: boolean;
}

/** Clients of both services, and of API keys, sharing one HTTP/2 connection.
 * @throws Error when an API key would go in plaintext to another machine. */
export declare function connect(
  serverUrl?: string,
  options?: ConnectOptions,
): {
  ingestion: Client<typeof IngestionService>;
  orchestrator: Client<typeof OrchestratorService>;
  keys: Client<typeof KeyService>;
};
