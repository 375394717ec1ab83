// The TypeScript driver of agentrun's conformance scenario (tests/conformance/scenario.json; its
// "comment" says the rules): this package's clients at the level of the proto3 JSON mapping, as
// every language's driver works. scripts/conformance.py (make conformance) starts a server,
// makes the keys and runs it:
//
//   node conformance/driver.mjs --server HOST:PORT --keys KEYS.json --scenario scenario.json
//
// It prints a line per step, then "passed N/M"; it exits 1 if a step failed.
import { fromJson, toJson } from "@bufbuild/protobuf";
import { ConnectError } from "@connectrpc/connect";
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { connect, IngestionService, OrchestratorService, WorkRequestSchema, WorkResponseSchema } from "../src/index.js";

const RECEIVE_MS = 10_000;
const TIMED_OUT = Symbol("timed out");
const CODES = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
  "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"];
const SERVICES = { IngestionService, OrchestratorService };
const VARIABLE = /\$\{([^}]+)\}/g;

class Failed extends Error {}

function lookup(saved, path) {
  let value = saved;
  for (const part of path.split(".")) {
    if (value === null || typeof value !== "object" || !(part in value)) return "";
    value = value[part];
  }
  return value;
}

function substitute(value, saved) {
  if (typeof value === "string") {
    const whole = /^\$\{([^}]+)\}$/.exec(value);
    if (whole) return lookup(saved, whole[1]);
    return value.replace(VARIABLE, (_, path) => String(lookup(saved, path)));
  }
  if (Array.isArray(value)) return value.map((v) => substitute(v, saved));
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, substitute(v, saved)]));
  }
  return value;
}

const isEmpty = (v) =>
  v === undefined || v === null || v === "" || (Array.isArray(v) && v.length === 0) ||
  (typeof v === "object" && !Array.isArray(v) && Object.keys(v).length === 0);

function match(expected, actual, where = "") {
  if (expected === "*") {
    if (isEmpty(actual)) throw new Failed(`${where || "answer"}: expected a value, got none`);
    return;
  }
  if (Array.isArray(expected)) {
    if (!Array.isArray(actual ?? []) || (actual ?? []).length !== expected.length) {
      throw new Failed(`${where}: expected ${expected.length} items, got ${JSON.stringify(actual)}`);
    }
    expected.forEach((e, i) => match(e, actual[i], `${where}[${i}]`));
    return;
  }
  if (expected && typeof expected === "object") {
    if (actual !== undefined && (actual === null || typeof actual !== "object")) {
      throw new Failed(`${where}: expected an object, got ${JSON.stringify(actual)}`);
    }
    for (const [key, value] of Object.entries(expected)) {
      match(value, (actual ?? {})[key], where ? `${where}.${key}` : key);
    }
    return;
  }
  if (actual === undefined && (expected === 0 || expected === false || expected === "")) return;
  if (typeof expected === "boolean" || typeof actual === "boolean") {
    if (expected !== actual) throw new Failed(`${where}: expected ${expected}, got ${actual}`);
    return;
  }
  if (String(expected) !== String(actual)) {
    throw new Failed(`${where}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
  }
}

/** An async iterable fed by push(); end() finishes it (the worker's half-close). */
class Queue {
  #items = [];
  #waiting = [];
  #ended = false;
  push(item) {
    const waiter = this.#waiting.shift();
    if (waiter) waiter({ value: item, done: false });
    else this.#items.push(item);
  }
  end() {
    this.#ended = true;
    for (const waiter of this.#waiting.splice(0)) waiter({ value: undefined, done: true });
  }
  next() {
    if (this.#items.length) return Promise.resolve({ value: this.#items.shift(), done: false });
    if (this.#ended) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve) => this.#waiting.push(resolve));
  }
  // A generator: Connect calls throw() and return() on the iterator of what it sends.
  async *[Symbol.asyncIterator]() {
    for (;;) {
      const { value, done } = await this.next();
      if (done) return;
      yield value;
    }
  }
}

const codeOf = (error) => CODES[ConnectError.from(error).code] ?? "UNKNOWN";

class WorkStream {
  constructor(orchestrator) {
    this.requests = new Queue();
    this.responses = new Queue();
    this.buffered = [];
    (async () => {
      try {
        for await (const response of orchestrator.work(this.requests)) {
          this.responses.push(toJson(WorkResponseSchema, response));
        }
        this.responses.push({ end: "OK" });
      } catch (error) {
        this.responses.push({ end: codeOf(error), message: ConnectError.from(error).rawMessage });
      }
    })();
  }
  send(json) {
    this.requests.push(fromJson(WorkRequestSchema, json));
  }
  /** The next message, or undefined after `ms`: a read that timed out stays pending for the next
   * call, so no message is lost to it. */
  async next(ms) {
    this.pending ??= this.responses.next().then((r) => r.value);
    let timer;
    const timeout = new Promise((resolve) => (timer = setTimeout(() => resolve(TIMED_OUT), ms)));
    const item = await Promise.race([this.pending, timeout]);
    clearTimeout(timer);
    if (item === TIMED_OUT) return undefined;
    this.pending = undefined;
    return item;
  }
  async receive(kind) {
    const at = this.buffered.findIndex((m) => kind in m);
    if (at >= 0) return this.buffered.splice(at, 1)[0];
    for (;;) {
      const message = await this.next(RECEIVE_MS);
      if (message === undefined) throw new Failed(`no ${kind} within ${RECEIVE_MS / 1000} s`);
      if ("end" in message) throw new Failed(`the stream ended ${message.end}: ${message.message}`);
      if (kind in message) return message;
      this.buffered.push(message);
    }
  }
}

async function runStep(step, context) {
  const { clientsOf, streams, saved } = context;
  const clients = clientsOf(step.as);
  const expect = substitute(step.expect, saved) ?? {};
  if (step.call) {
    const [serviceName, methodName] = step.call.split("/");
    const method = SERVICES[serviceName].methods.find((m) => m.name === methodName);
    const client = serviceName === "IngestionService" ? clients.ingestion : clients.orchestrator;
    let code = "OK";
    let answer = {};
    try {
      let response;
      if (step.requests) {
        const requests = step.requests.map((r) => fromJson(method.input, substitute(r, saved)));
        response = await client[method.localName]((async function* () { yield* requests; })());
      } else {
        response = await client[method.localName](fromJson(method.input, substitute(step.request, saved)));
      }
      answer = toJson(method.output, response);
    } catch (error) {
      code = codeOf(error);
    }
    match(expect.code ?? "OK", code, "code");
    match(expect.response ?? {}, answer, "response");
    for (const [name, where] of Object.entries(step.save ?? {})) saved[name] = lookup(answer, where);
    return;
  }
  if (step.open) {
    const stream = (streams[step.stream] = new WorkStream(clients.orchestrator));
    stream.send({ subscribe: substitute(step.open, saved) });
    const first = await stream.next(RECEIVE_MS);
    if (first === undefined) throw new Failed("no answer to subscribe");
    match(expect.code ?? "OK", first.end ?? "OK", "code");
    if (!("end" in first)) {
      const { code: _, ...rest } = expect;
      match(rest, first, "");
    }
    return;
  }
  const stream = streams[step.stream];
  if (step.send) stream.send(substitute(step.send, saved));
  if (step.receive === "leases") {
    const leases = [];
    while (leases.length < step.count) leases.push(...(await stream.receive("leases")).leases.leases);
    if (leases.length > step.count) throw new Failed(`expected ${step.count} leases, got ${leases.length}`);
    if (step.expect) match(substitute(step.expect, saved), leases, "leases");
    (step.save ?? []).forEach((name, i) => (saved[name] = leases[i]));
    return;
  }
  if (step.receive) {
    const message = (await stream.receive(step.receive))[step.receive];
    if (step.expect) match(expect, message, step.receive);
    for (const [name, where] of Object.entries(step.save ?? {})) saved[name] = lookup(message, where);
    return;
  }
  if (step.quiet !== undefined) {
    const message = await stream.next(step.quiet * 1000);
    if (message !== undefined) throw new Failed(`expected nothing for ${step.quiet} s, got ${JSON.stringify(message)}`);
    return;
  }
  if (step.close) {
    stream.requests.end();
    for (;;) {
      const message = await stream.next(RECEIVE_MS);
      if (message === undefined) throw new Failed("the stream did not end after the half-close");
      if ("end" in message) return match(expect.code ?? "OK", message.end, "code");
    }
  }
}

const { values } = parseArgs({
  options: { server: { type: "string" }, keys: { type: "string" }, scenario: { type: "string" } },
});
const scenario = JSON.parse(readFileSync(values.scenario ?? "tests/conformance/scenario.json", "utf8"));
const keys = JSON.parse(readFileSync(values.keys, "utf8"));
const connections = {};
const clientsOf = (name) =>
  (connections[name ?? ""] ??= connect(values.server, name ? { apiKey: keys[name] } : {}));
const context = { clientsOf, streams: {}, saved: {} };
let passed = 0;
for (const step of scenario.steps) {
  try {
    await runStep(step, context);
    passed += 1;
    console.log(`ok   ${step.name}`);
  } catch (error) {
    if (!(error instanceof Failed)) throw error;
    console.log(`FAIL ${step.name}: ${error.message}`);
  }
}
for (const stream of Object.values(context.streams)) stream.requests.end();
console.log(`passed ${passed}/${scenario.steps.length}`);
process.exit(passed === scenario.steps.length ? 0 : 1);
