// @herald/client/server (the Node publisher) against a real gateway
// (`herald serve`): positions, owners and terminal notifications reaching a
// real WebSocket subscriber, typed errors with the gateway's codes, the
// idempotency key, and batches.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { WebSocket } from "ws";

import { HeraldClient } from "../dist/index.js";
import { HeraldPublisher, PublishError } from "../dist/server.js";
import { API_KEY, Gateway, freePort, rejection, token, until } from "./gateway.mjs";

globalThis.WebSocket = WebSocket;

let gw;
before(async () => { gw = await Gateway.start({ HERALD_MAX_PUBLISH_BYTES: "4096" }); });
after(async () => { await gw.stop(); });

/** A subscriber of our own (the browser client over `ws`), connected. */
async function watcher(sub, channels) {
  const got = [];
  const c = new HeraldClient({ url: gw.url, token: token(sub), backoffMaxMs: 100 });
  for (const ch of channels) c.subscribe(ch, { onMessage: (m) => got.push(m) });
  c.connect();
  await until(() => c.state === "connected", { what: "connected" });
  return { c, got };
}

test("publish answers the position, offsets follow each other", async () => {
  const pub = new HeraldPublisher(gw.url, API_KEY);
  const a = await pub.publish("system:news", "hello", { n: 1 });
  const b = await pub.publish("system:news", "hello", { n: 2 });
  assert.equal(a.channel, "system:news");
  assert.equal(typeof a.epoch, "string");
  assert.equal(b.offset, a.offset + 1);
  assert.equal(b.epoch, a.epoch);
});

test("registerJob + jobProgress reach the owner's subscriber; a terminal status notifies user:{owner}", async () => {
  const pub = new HeraldPublisher(gw.url, API_KEY);
  await pub.registerJob("n1", "owner-1");
  const { c, got } = await watcher("owner-1", ["job:n1", "user:owner-1"]);
  try {
    await until(() => c._channels.get("job:n1")?.epoch, { what: "subscribed" });
    await pub.jobProgress("n1", "owner-1", "processing", 40, { stage: "encode", message: "half way" });
    await pub.jobProgress("n1", "owner-1", "completed", 100);
    await until(() => got.length >= 3, { what: "progress and the notification" });
    const job = got.filter((m) => m.channel === "job:n1");
    assert.deepEqual(job.map((m) => [m.event, m.data.status, m.data.progress]), [
      ["progress", "processing", 40], ["progress", "completed", 100],
    ]);
    assert.deepEqual(job[0].data, { jobId: "n1", status: "processing", progress: 40, stage: "encode", message: "half way" });
    const note = got.find((m) => m.channel === "user:owner-1");
    assert.ok(note, "no notification on user:owner-1");
    assert.equal(note.event, "notification");
  } finally {
    c.close();
  }
});

test("broadcast: one event, one position per (distinct) channel", async () => {
  const pub = new HeraldPublisher(gw.url, API_KEY);
  const out = await pub.broadcast(["system:a", "system:b", "system:a"], "tick", { t: 1 });
  assert.deepEqual(out.map((p) => p.channel), ["system:a", "system:b"]);
});

test("errors carry the gateway's code and HTTP status", async () => {
  const pub = new HeraldPublisher(gw.url, API_KEY);
  await pub.registerJob("owned", "alice");
  let err = await rejection(pub.jobProgress("owned", "mallory", "processing", 1));
  assert.ok(err instanceof PublishError);
  assert.deepEqual([err.code, err.status], ["forbidden", 403]);
  err = await rejection(pub.publish("system:big", "e", { blob: "x".repeat(8192) }));
  assert.deepEqual([err.code, err.status], ["message_too_large", 413]);
  err = await rejection(pub.publish("no such namespace!", "e", {}));
  assert.deepEqual([err.code, err.status], ["bad_request", 400]);
  err = await rejection(new HeraldPublisher(gw.url, "wrong-key").publish("system:x", "e", {}));
  assert.deepEqual([err.code, err.status], ["unauthorized", 401]);
  const nowhere = new HeraldPublisher(`http://127.0.0.1:${await freePort()}`, API_KEY, { timeoutMs: 2000 });
  err = await rejection(nowhere.publish("system:x", "e", {}));
  assert.deepEqual([err.code, err.status], ["unavailable", null]);
  err = await rejection(pub.jobProgress("owned", "alice", "", 1));
  assert.equal(err.code, "bad_request");
  err = await rejection(pub.jobProgress("owned", "alice", "processing", Number.NaN));
  assert.equal(err.code, "bad_request");
  err = await rejection(pub.publish("system:x", "e", { n: 1n })); // BigInt is not JSON
  assert.equal(err.code, "bad_request");
});

test("the idempotency key is checked before anything is sent", async () => {
  const pub = new HeraldPublisher(gw.url, API_KEY);
  for (const key of ["", "has space", "x".repeat(129), "ünï"]) {
    const err = await rejection(pub.publish("system:k", "e", {}, { idempotencyKey: key }));
    assert.equal(err.code, "bad_request", key);
  }
  const ok = await pub.publish("system:k", "e", {}, { idempotencyKey: "feed:1" });
  assert.equal(ok.channel, "system:k");
});

test("a retry with the same idempotency key publishes nothing new: the original position, duplicate", async () => {
  const pub = new HeraldPublisher(gw.url, API_KEY);
  const first = await pub.jobProgress("idem", "ivy", "processing", 10, { idempotencyKey: "job-idem-10" });
  const again = await pub.jobProgress("idem", "ivy", "processing", 10, { idempotencyKey: "job-idem-10" });
  assert.equal(first.duplicate, undefined);
  assert.deepEqual(again, { ...first, duplicate: true });
  const batched = new HeraldPublisher(gw.url, API_KEY, { batch: true }); // the key in a batch item
  const [a, b] = await Promise.all([
    batched.publish("system:idem", "e", 1, { idempotencyKey: "sys-1" }),
    batched.publish("system:idem", "e", 1, { idempotencyKey: "sys-1" }),
  ]);
  assert.equal(b.offset, a.offset);
  assert.ok(a.duplicate === true || b.duplicate === true);
  await batched.close();
});

test("batching: concurrent publishes share requests, each settles with its own outcome, order kept", async () => {
  const pub = new HeraldPublisher(gw.url, API_KEY, { batch: { lingerMs: 5, maxItems: 50 } });
  await pub.registerJob("b1", "bob");
  const calls = [];
  for (let i = 0; i < 30; i += 1) calls.push(pub.publish("system:batch", "n", { i }));
  calls.push(pub.jobProgress("b1", "eve", "processing", 1)); // refused: bob owns it
  const settled = await Promise.allSettled(calls);
  const offsets = settled.slice(0, 30).map((s) => s.value.offset);
  assert.deepEqual(offsets, offsets.map((_, i) => offsets[0] + i));
  assert.equal(settled[30].status, "rejected");
  assert.equal(settled[30].reason.code, "forbidden");
  const many = await pub.publishMany([
    { channel: "system:many", event: "e", data: 1 },
    { channel: "system:many", event: "e", data: 2, idempotencyKey: "m-2" },
    { channel: "job:b1", event: "e", data: 3, owner: "eve" },
  ]);
  assert.equal(many[1].offset, many[0].offset + 1);
  assert.ok(many[2] instanceof PublishError && many[2].code === "forbidden");
  await pub.close();
});
