// A stage worker for Node.js, as the Python Runner and the Go work.Worker are: WorkProtocol holds
// the rules of the Work stream with no I/O (a port of the Python SDK's agentrun.work.WorkProtocol,
// the reference), and Worker drives it over the stream across reconnects, calling a stage
// function per lease.
import { NullValue } from "@bufbuild/protobuf/wkt";

import { connect } from "./index.js";

const OK = 0;
const INVALID_ARGUMENT = 3;
const KINDS = ["completeTasks", "failTasks", "releaseTasks", "extendLeases"];
const FIELDS = { completeTasks: "completions", failTasks: "failures", releaseTasks: "releases", extendLeases: "extensions" };
// Codes another attempt is answered the same (the SDK's one retry policy): the stream ends.
const REFUSED = new Set([3, 5, 6, 7, 9, 11, 12, 16]);

const seconds = (timestamp) => Number(timestamp?.seconds ?? 0n) + (timestamp?.nanos ?? 0) / 1e9;
const duration = (s) => ({ seconds: BigInt(Math.floor(s)), nanos: Math.round((s % 1) * 1e9) });

/** Thrown by a stage function: the task fails for good (a dead letter), not retried. */
export class PermanentError extends Error {}

/** Thrown by a stage function: run the task again after `afterMs`, no attempt spent. */
export class RetryLater extends Error {
  constructor(afterMs) {
    super(`run again in ${afterMs} ms`);
    this.afterMs = afterMs;
  }
}

/**
 * A JSON-like JavaScript value as the wire's Value (integers kept apart from other numbers):
 * null, booleans, numbers, bigints, strings, arrays and plain objects (keys in their order).
 * @throws {TypeError} anything else, or nesting deeper than `maxDepth`.
 */
export function toValue(value, maxDepth = 20) {
  if (maxDepth < 0) throw new TypeError("a value nested too deep");
  if (value === null || value === undefined) return { kind: { case: "nullValue", value: NullValue.NULL_VALUE } };
  switch (typeof value) {
    case "boolean":
      return { kind: { case: "boolValue", value } };
    case "string":
      return { kind: { case: "stringValue", value } };
    case "number":
      return Number.isSafeInteger(value)
        ? { kind: { case: "intValue", value: BigInt(value) } }
        : { kind: { case: "doubleValue", value } };
    case "bigint":
      return BigInt.asIntN(64, value) === value
        ? { kind: { case: "intValue", value } }
        : { kind: { case: "bigIntValue", value: value.toString() } };
  }
  if (Array.isArray(value)) {
    return { kind: { case: "listValue", value: { values: value.map((v) => toValue(v, maxDepth - 1)) } } };
  }
  if (Object.getPrototypeOf(value) === Object.prototype) {
    const fields = Object.entries(value).map(([key, v]) => ({ key, value: toValue(v, maxDepth - 1) }));
    return { kind: { case: "structValue", value: { fields } } };
  }
  throw new TypeError(`not JSON-like: ${Object.prototype.toString.call(value)}`);
}

/** The wire's Value as JavaScript: integers as numbers when safe, else bigints. */
export function fromValue(value) {
  const kind = value?.kind;
  switch (kind?.case) {
    case "boolValue":
    case "stringValue":
    case "doubleValue":
      return kind.value;
    case "intValue":
      return Number.isSafeInteger(Number(kind.value)) ? Number(kind.value) : kind.value;
    case "bigIntValue":
      return BigInt(kind.value);
    case "listValue":
      return kind.value.values.map(fromValue);
    case "structValue":
      return Object.fromEntries(kind.value.fields.map((f) => [f.key, fromValue(f.value)]));
    default:
      return null;
  }
}

/**
 * One worker's Work session across the streams that carry it, with no I/O and no clock: the
 * caller writes what `outgoing(now)` returns, hands over what it reads, and says when a stream
 * starts. Times are epoch seconds. The rules are agentrun.work.WorkProtocol's (README: "The Work
 * stream, for workers in any language").
 */
export class WorkProtocol {
  constructor(workflow, stages, credits, { notifyWhenEmpty = false, worker = "" } = {}) {
    Object.assign(this, { workflow, stages, credits, notifyWhenEmpty, worker });
    this.held = new Map(); // task id -> { lease, deadline, duration, extending }
    this.ready = [];
    this.empty = false;
    this.draining = false;
    this.closing = false;
    this.reconnectAsked = false;
    this.refusals = [];
    this.pending = Object.fromEntries(KINDS.map((k) => [k, []]));
    this.written = [];
    this.resent = new Set();
    this.drainPending = false;
    this.idleTimeout = 0;
    this.lastWrite = 0;
  }

  /** The first message of a new stream, resuming every lease held, and the leases it resumes. */
  subscribe(now) {
    this.reconnectAsked = false;
    this.lastWrite = now;
    const resumed = [...this.held.values()].map((h) => h.lease);
    const request = {
      kind: {
        case: "subscribe",
        value: {
          workflow: this.workflow,
          stages: this.stages.map((stage) => ({ stage })),
          credits: this.credits,
          worker: this.worker,
          notifyWhenEmpty: this.notifyWhenEmpty,
          resume: resumed.map((l) => ({ taskId: l.taskId, leaseId: l.leaseId })),
        },
      },
    };
    return { request, resumed };
  }

  /** The answer to subscribe; the leases not resumed ([lease, reason]). */
  onSubscribed(subscribed, resumed) {
    this.idleTimeout = subscribed.idleTimeout ? seconds(subscribed.idleTimeout) : 0;
    const revoked = [];
    resumed.forEach((lease, i) => {
      const ack = subscribed.resumed[i];
      const held = this.held.get(lease.taskId);
      if (!ack || !held || held.lease.leaseId !== lease.leaseId) return;
      if (ack.code === OK) {
        held.deadline = seconds(ack.deadline);
        held.extending = false;
      } else {
        revoked.push([this.#revoke(held), `not resumed: ${ack.message}`]);
      }
    });
    for (const [kind, items] of this.written) {
      if (kind === "extendLeases") continue; // redone when they come due
      this.pending[kind].unshift(...items);
      for (const item of items) this.resent.add(`${item.taskId}/${item.leaseId}`);
    }
    this.written = [];
    for (const held of this.held.values()) held.extending = false;
    this.drainPending = this.draining;
    return revoked;
  }

  /** A message from the server; the leases it took back ([lease, reason]). */
  onResponse(response, now) {
    const { case: kind, value } = response.kind;
    if (kind === "leases") {
      for (const lease of value.leases) {
        const deadline = seconds(lease.deadline);
        this.held.set(lease.taskId, { lease, deadline, duration: Math.max(0, deadline - now), extending: false });
        this.ready.push(lease);
      }
      this.empty = false;
    } else if (kind === "acks") {
      this.#onAcks(value);
    } else if (kind === "revoked") {
      const revoked = [];
      for (const item of value.leases) {
        const held = this.held.get(item.taskId);
        if (held && held.lease.leaseId === item.leaseId) revoked.push([this.#revoke(held), `revoked (${item.reason})`]);
      }
      return revoked;
    } else if (kind === "stagesEmpty") {
      this.empty = true;
    } else if (kind === "reconnect") {
      this.reconnectAsked = true;
    }
    return [];
  }

  #revoke(held) {
    this.held.delete(held.lease.taskId);
    this.ready = this.ready.filter((lease) => lease !== held.lease);
    return held.lease;
  }

  #onAcks(batch) {
    const written = this.written.shift();
    if (!written) return;
    const [kind] = written;
    for (const ack of batch.acks) {
      const held = this.held.get(ack.taskId);
      if (kind === "extendLeases" && held && held.lease.leaseId === ack.leaseId) {
        held.extending = false;
        if (ack.code === OK) held.deadline = seconds(ack.deadline);
      }
      const key = `${ack.taskId}/${ack.leaseId}`;
      const resent = this.resent.delete(key);
      if (ack.code === INVALID_ARGUMENT && (kind === "completeTasks" || kind === "releaseTasks")) {
        // Refused as malformed, the lease still held on the server: fail the attempt with the
        // server's reason rather than leave it leased until it expires.
        const verb = kind === "completeTasks" ? "completion" : "release";
        this.pending.failTasks.push({
          taskId: ack.taskId, leaseId: ack.leaseId,
          error: `the server refused the worker's ${verb}: ${ack.message}`,
          nonRetryable: kind === "completeTasks",
        });
      }
      if (ack.code !== OK) this.refusals.push({ taskId: ack.taskId, kind, code: ack.code, message: ack.message, resent });
    }
  }

  holds(lease) {
    return this.held.get(lease.taskId)?.lease.leaseId === lease.leaseId;
  }

  #settle(lease, kind, item) {
    if (!this.holds(lease)) return false;
    this.held.delete(lease.taskId);
    this.pending[kind].push({ taskId: lease.taskId, leaseId: lease.leaseId, ...item });
    return true;
  }

  /** Queue a completion with a pathway and an optional output (a Value); false if not held. */
  complete(lease, pathway, output) {
    return this.#settle(lease, "completeTasks", { pathway, output });
  }

  /** Queue a failed attempt (retried unless nonRetryable or its attempts are spent). */
  fail(lease, error, nonRetryable = false, retryAfterSeconds = 0) {
    return this.#settle(lease, "failTasks", {
      error, nonRetryable, retryAfter: retryAfterSeconds > 0 ? duration(retryAfterSeconds) : undefined,
    });
  }

  /** Queue a hand-back, no attempt spent: ready again at once or after `afterSeconds`. */
  release(lease, afterSeconds = 0) {
    return this.#settle(lease, "releaseTasks", { retryAfter: afterSeconds > 0 ? duration(afterSeconds) : undefined });
  }

  /** Ask for no more leases; what was received and not started is handed back. */
  drain() {
    if (this.draining) return;
    this.draining = this.drainPending = true;
    for (const lease of this.ready.splice(0)) this.release(lease);
  }

  close() {
    this.closing = true;
    for (const lease of this.ready.splice(0)) this.release(lease);
  }

  /** The messages to write now: a drain first, one message per kind of settle, extensions due,
   * or a heartbeat after a third of the idle timeout of silence. */
  outgoing(now) {
    if (this.reconnectAsked) return [];
    const out = [];
    if (this.drainPending) {
      this.drainPending = false;
      out.push({ kind: { case: "drain", value: {} } });
    }
    for (const held of this.held.values()) {
      if (!held.extending && held.deadline - now < held.duration / 2) {
        held.extending = true;
        this.pending.extendLeases.push({
          taskId: held.lease.taskId, leaseId: held.lease.leaseId, leaseDuration: duration(held.duration),
        });
      }
    }
    for (const kind of KINDS) {
      const items = this.pending[kind];
      if (!items.length) continue;
      this.pending[kind] = [];
      this.written.push([kind, items]);
      out.push({ kind: { case: kind, value: { [FIELDS[kind]]: items } } });
    }
    if (!out.length && this.idleTimeout > 0 && now - this.lastWrite >= this.idleTimeout / 3) {
      out.push({ kind: { case: "heartbeat", value: {} } });
    }
    if (out.length) this.lastWrite = now;
    return out;
  }

  get doneWriting() {
    return this.reconnectAsked || (this.closing && KINDS.every((k) => !this.pending[k].length));
  }

  /** When outgoing may next have something to write unprompted; at most a second from now. */
  nextWriteAt(now) {
    let soon = now + 1;
    for (const held of this.held.values()) {
      if (!held.extending) soon = Math.min(soon, held.deadline - held.duration / 2);
    }
    if (this.idleTimeout > 0) soon = Math.min(soon, this.lastWrite + this.idleTimeout / 3);
    return Math.max(now, soon);
  }

  get unsettled() {
    const settles = KINDS.slice(0, 3);
    return settles.reduce((n, k) => n + this.pending[k].length, 0) +
      this.written.filter(([k]) => k !== "extendLeases").reduce((n, [, items]) => n + items.length, 0);
  }

  get finished() {
    return this.held.size === 0 && (this.empty || this.draining || this.closing);
  }
}

/** An async iterable fed by push(); end() finishes it. A generator, as Connect wants. */
class Requests {
  #items = [];
  #wake = null;
  #ended = false;
  push(item) {
    this.#items.push(item);
    this.#wake?.();
  }
  end() {
    this.#ended = true;
    this.#wake?.();
  }
  async *[Symbol.asyncIterator]() {
    for (;;) {
      if (this.#items.length) yield this.#items.shift();
      else if (this.#ended) return;
      else await new Promise((resolve) => (this.#wake = resolve));
      this.#wake = null;
    }
  }
}

/**
 * Works the tasks of a workflow's stages with stage functions, as the Python Runner does. A stage
 * function gets the lease (its run in `lease.agentRun`, the previous stage's output as `input`)
 * and an AbortSignal that aborts when the lease is revoked; it returns a pathway, or
 * `{ pathway, output }` (output JSON-like), and may throw: PermanentError fails the task for good,
 * RetryLater(ms) runs it again later without spending an attempt, anything else fails the
 * attempt (retried with backoff).
 *
 *   const worker = new Worker({ workflow: "grading", stages: { triage: async (lease) => "solved" } });
 *   process.on("SIGTERM", () => worker.drain());
 *   const summary = await worker.run();
 *
 * @param {object} options
 * @param {string} options.workflow
 * @param {Record<string, Function>} options.stages stage name -> stage function
 * @param {number} [options.credits] tasks at once (default 16)
 * @param {boolean} [options.exitWhenEmpty] return once the stages hold no task
 * @param {string} [options.serverUrl] as connect()'s; `connection` options go to connect()
 */
export class Worker {
  constructor({ workflow, stages, credits = 16, exitWhenEmpty = false, name = "node-worker", serverUrl, connection = {} }) {
    this.stages = stages;
    this.protocol = new WorkProtocol(workflow, Object.keys(stages), credits, { notifyWhenEmpty: exitWhenEmpty, worker: name });
    this.clients = connect(serverUrl, connection);
    this.running = new Map(); // task/lease -> AbortController
    this.summary = { completed: {}, failed: {}, dead: {}, retried: {}, revoked: {} };
    this.wake = null;
  }

  /** No new leases; run() returns once the running tasks are settled. */
  drain() {
    this.protocol.drain();
    this.wake?.();
  }

  /** Work until drained, the stages are empty (exitWhenEmpty), or the stream is refused for
   * good (thrown: a ConnectError). Broken streams are reopened and their leases resumed. */
  async run() {
    for (let attempt = 1; ; attempt++) {
      let error;
      let streamed = false;
      try {
        streamed = await this.#stream();
      } catch (caught) {
        error = caught;
      }
      const p = this.protocol;
      if (p.closing && p.unsettled === 0 && this.running.size === 0) return this.summary;
      if (streamed) attempt = 1;
      if (error && REFUSED.has(error.code)) {
        for (const controller of this.running.values()) controller.abort();
        throw error;
      }
      const delay = Math.min(30, 0.25 * 2 ** (attempt - 1)) * (0.8 + 0.4 * Math.random());
      console.warn(`agentrun: work stream ${error ? `broke (${error.message})` : "ended"}; reconnecting in ${delay.toFixed(1)} s, ${p.held.size} leases held`);
      await new Promise((resolve) => setTimeout(resolve, delay * 1000));
    }
  }

  #count(kind, stage) {
    this.summary[kind][stage] = (this.summary[kind][stage] ?? 0) + 1;
  }

  async #stream() {
    const p = this.protocol;
    const requests = new Requests();
    const responses = this.clients.orchestrator.work(requests)[Symbol.asyncIterator]();
    const { request, resumed } = p.subscribe(Date.now() / 1000);
    requests.push(request);
    const first = await responses.next();
    if (first.done) return false;
    for (const [lease, why] of p.onSubscribed(first.value.kind.value, resumed)) this.#revoked(lease, why);
    let reading = responses.next();
    let closed = false;
    for (;;) {
      this.#start();
      if (!closed) for (const message of p.outgoing(Date.now() / 1000)) requests.push(message);
      if (!p.closing && p.finished && this.running.size === 0 && p.unsettled === 0) p.close();
      if (!closed && p.doneWriting) {
        closed = true;
        requests.end();
      }
      const wait = Math.max(0, p.nextWriteAt(Date.now() / 1000) * 1000 - Date.now());
      let timer;
      const woken = new Promise((resolve) => {
        this.wake = () => resolve("woken");
        timer = setTimeout(() => resolve("timer"), wait);
      });
      const got = await Promise.race([reading, woken]);
      clearTimeout(timer);
      this.wake = null;
      if (got === "woken" || got === "timer") continue;
      if (got.done) return true;
      reading = responses.next();
      for (const [lease, why] of p.onResponse(got.value, Date.now() / 1000)) this.#revoked(lease, why);
      for (const refusal of p.refusals.splice(0)) {
        if (!refusal.resent) console.warn(`agentrun: task ${refusal.taskId}: the server refused its ${refusal.kind}: ${refusal.message}`);
      }
    }
  }

  #revoked(lease, why) {
    this.#count("revoked", lease.stage);
    this.running.get(`${lease.taskId}/${lease.leaseId}`)?.abort();
    console.warn(`agentrun: task ${lease.taskId} (${lease.stage}) ${why}`);
  }

  #start() {
    const p = this.protocol;
    while (p.ready.length) {
      const lease = p.ready.shift();
      const stage = this.stages[lease.stage];
      if (!stage || p.draining) {
        p.release(lease);
        continue;
      }
      const controller = new AbortController();
      const key = `${lease.taskId}/${lease.leaseId}`;
      this.running.set(key, controller);
      const input = lease.input ? fromValue(lease.input) : undefined;
      Promise.resolve()
        .then(() => stage(lease, { signal: controller.signal, input }))
        .then(
          (result) => this.#settle(lease, result, undefined),
          (error) => this.#settle(lease, undefined, error ?? new Error("rejected")),
        )
        .finally(() => {
          this.running.delete(key);
          this.wake?.();
        });
    }
  }

  #settle(lease, result, error) {
    const p = this.protocol;
    if (!p.holds(lease)) return; // revoked meanwhile: never settled
    if (error instanceof RetryLater) {
      this.#count("retried", lease.stage);
      p.release(lease, error.afterMs / 1000);
    } else if (error) {
      const final = error instanceof PermanentError || lease.attempt >= lease.maxAttempts;
      this.#count("failed", lease.stage);
      if (final) this.#count("dead", lease.stage);
      console.warn(`agentrun: task ${lease.taskId} (${lease.stage}) attempt ${lease.attempt}/${lease.maxAttempts} failed: ${error.message}`);
      p.fail(lease, `${error.name}: ${error.message}`, error instanceof PermanentError);
    } else {
      const { pathway = "", output } = typeof result === "string" || result == null ? { pathway: result ?? "" } : result;
      let value;
      try {
        value = output === undefined ? undefined : toValue(output);
      } catch (bad) {
        this.#count("dead", lease.stage);
        p.fail(lease, `stage function returned an output that is not JSON-like: ${bad.message}`, true);
        return;
      }
      this.#count("completed", lease.stage);
      p.complete(lease, pathway, value);
    }
  }
}
