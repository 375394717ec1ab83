// connect()'s options, as the Python SDK's Connection: no server needed.
import assert from "node:assert/strict";
import { test } from "node:test";

import { baseUrl, connect, isLoopback } from "../src/index.js";

test("server URLs map to base URLs", () => {
  assert.equal(baseUrl("127.0.0.1:50051"), "http://127.0.0.1:50051");
  assert.equal(baseUrl("grpcs://agentrun.example:443"), "https://agentrun.example:443");
  assert.equal(baseUrl("grpc://10.0.0.1:50051/"), "http://10.0.0.1:50051");
});

test("only this machine's addresses are loopback", () => {
  for (const host of ["127.0.0.1:1", "localhost:1", "[::1]:1", "127.9.9.9:1"]) {
    assert.ok(isLoopback(host), host);
  }
  for (const host of ["10.0.0.1:1", "agentrun.example:443", "[2001:db8::1]:1"]) {
    assert.ok(!isLoopback(host), host);
  }
});

test("an API key is never sent in plaintext to another machine unless allowed", () => {
  assert.throws(() => connect("grpc://10.0.0.1:50051", { apiKey: "ark_x" }), /plaintext to 10\.0\.0\.1:50051/);
  assert.throws(() => connect("10.0.0.1:50051", { apiKey: "ark_x", tls: false }), /plaintext/);
  connect("10.0.0.1:50051", { apiKey: "ark_x", tls: false, allowPlaintextKey: true });
  connect("10.0.0.1:50051", { apiKey: "ark_x" }); // TLS turns on by itself
  connect("127.0.0.1:50051", { apiKey: "ark_x" }); // this machine: plaintext is fine
});

test("half a client certificate is refused", () => {
  assert.throws(() => connect("127.0.0.1:1", { tlsCert: "-----BEGIN CERTIFICATE-----" }), /give both/);
});
