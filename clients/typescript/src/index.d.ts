import type { Client } from "@connectrpc/connect";
import type { IngestionService } from "./gen/agentrun/v1/ingestion_service_pb.js";
import type { KeyService } from "./gen/agentrun/v1/key_service_pb.js";
import type { OrchestratorService } from "./gen/agentrun/v1/orchestrator_service_pb.js";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { Value, ValueSchema } from "./gen/agentrun/v1/agent_run_pb.js";
import type {
  Lease,
  Subscribed,
  WorkRequestSchema,
  WorkResponse,
} from "./gen/agentrun/v1/orchestrator_service_pb.js";

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

/** Thrown by a stage function: the task fails for good (a dead letter), not retried. */
export declare class PermanentError extends Error {}

/** Thrown by a stage function: run the task again after `afterMs`, no attempt spent. */
export declare class RetryLater extends Error {
  constructor(afterMs: number);
  afterMs: number;
}

/** A JSON-like value: what a stage function may return as its output. */
export type JsonLike = null | boolean | number | bigint | string | JsonLike[] | { [key: string]: JsonLike };

/** A JSON-like value as the wire's Value (integers kept apart from other numbers). */
export declare function toValue(value: JsonLike, maxDepth?: number): MessageInitShape<typeof ValueSchema>;
/** The wire's Value as JavaScript. */
export declare function fromValue(value: Value | undefined): JsonLike;

/** What a stage function returns: a pathway ("" or nothing at a stage without pathways), or a
 * pathway and a JSON-like output for the next stage. */
export type StageResult = string | void | { pathway?: string; output?: JsonLike };

/** A stage function: the lease (its run in `lease.agentRun`); `input` is the previous stage's
 * output; `signal` aborts when the lease is revoked. */
export type StageFunction = (
  lease: Lease,
  context: { signal: AbortSignal; input: JsonLike | undefined },
) => StageResult | Promise<StageResult>;

export interface WorkerOptions {
  workflow: string;
  stages: Record<string, StageFunction>;
  /** Tasks at once (default 16). */
  credits?: number;
  /** Return once the stages hold no task. */
  exitWhenEmpty?: boolean;
  /** A name for the server's logs. */
  name?: string;
  serverUrl?: string;
  connection?: ConnectOptions;
}

/** Counts by stage of what a Worker did. */
export interface WorkerSummary {
  completed: Record<string, number>;
  failed: Record<string, number>;
  dead: Record<string, number>;
  retried: Record<string, number>;
  revoked: Record<string, number>;
}

/** Works the tasks of a workflow's stages with stage functions, as the Python Runner does:
 * credits, batched settles, lease extension, heartbeats, reconnect and resume, drain. */
export declare class Worker {
  constructor(options: WorkerOptions);
  /** No new leases; run() resolves once the running tasks are settled. */
  drain(): void;
  /** Work until drained, the stages are empty (exitWhenEmpty), or the stream is refused for good
   * (rejects with a ConnectError). */
  run(): Promise<WorkerSummary>;
}

/** The worker's half of the Work protocol as a state machine with no I/O (a port of the Python
 * SDK's agentrun.work.WorkProtocol). */
export declare class WorkProtocol {
  constructor(
    workflow: string,
    stages: string[],
    credits: number,
    options?: { notifyWhenEmpty?: boolean; worker?: string },
  );
  held: Map<string, { lease: Lease; deadline: number; duration: number; extending: boolean }>;
  ready: Lease[];
  empty: boolean;
  draining: boolean;
  closing: boolean;
  reconnectAsked: boolean;
  subscribe(now: number): { request: MessageInitShape<typeof WorkRequestSchema>; resumed: Lease[] };
  onSubscribed(subscribed: Subscribed, resumed: Lease[]): [Lease, string][];
  onResponse(response: WorkResponse, now: number): [Lease, string][];
  holds(lease: Lease): boolean;
  complete(lease: Lease, pathway: string, output?: MessageInitShape<typeof ValueSchema>): boolean;
  fail(lease: Lease, error: string, nonRetryable?: boolean, retryAfterSeconds?: number): boolean;
  release(lease: Lease, afterSeconds?: number): boolean;
  drain(): void;
  close(): void;
  outgoing(now: number): MessageInitShape<typeof WorkRequestSchema>[];
  readonly doneWriting: boolean;
  nextWriteAt(now: number): number;
  readonly unsettled: number;
  readonly finished: boolean;
}
