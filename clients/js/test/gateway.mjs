// Test support: a real `herald serve` process on a free loopback port, the
// way tests/conftest.py starts one, plus the few HTTP calls the tests need.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { once } from "node:events";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer, connect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const REPO = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
/** `herald` from the repository's venv (./dev.sh test makes it); HERALD_BIN overrides. */
export const HERALD = process.env.HERALD_BIN || join(REPO, process.env.HERALD_VENV || ".venv", "bin", "herald");
export const SECRET = "node-test-secret-0123456789abcdef0123";
export const API_KEY = "node-test-api-key";

export async function freePort() {
  const server = createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address();
  server.close();
  await once(server, "close");
  return port;
}

function b64url(value) {
  return Buffer.from(typeof value === "string" ? value : JSON.stringify(value)).toString("base64url");
}

/** An HS256 JWT the gateway accepts (the same claims as `herald token`). */
export function token(sub, ttlSeconds = 3600) {
  const now = Math.floor(Date.now() / 1000);
  const head = `${b64url({ alg: "HS256", typ: "JWT" })}.${b64url({ sub, iat: now, exp: now + ttlSeconds })}`;
  return `${head}.${createHmac("sha256", SECRET).update(head).digest("base64url")}`;
}

async function portOpen(port) {
  return new Promise((resolve) => {
    const sock = connect(port, "127.0.0.1");
    sock.once("connect", () => { sock.destroy(); resolve(true); });
    sock.once("error", () => resolve(false));
  });
}

// Each gateway keeps its durable store in a state directory of its own (one
// herald process per store: a second one on the same file is refused), kept
// across its own restarts and removed when the test process exits.
const stateDirs = [];
process.on("exit", () => { for (const dir of stateDirs) rmSync(dir, { recursive: true, force: true }); });

export class Gateway {
  constructor(port, env = {}) {
    this.port = port;
    this.url = `http://127.0.0.1:${port}`;
    this.env = env;
    this.proc = null;
    this.stateDir = mkdtempSync(join(tmpdir(), "herald-node-test-"));
    stateDirs.push(this.stateDir);
  }

  static async start(env = {}) {
    const gw = new Gateway(await freePort(), env);
    await gw.start();
    return gw;
  }

  async start() {
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("HERALD_")));
    Object.assign(env, {
      HERALD_HOST: "127.0.0.1",
      HERALD_PORT: String(this.port),
      HERALD_JWT_SECRET: SECRET,
      HERALD_API_KEY: API_KEY,
      HERALD_DEMO: "false",
      HERALD_LOG_LEVEL: "WARNING",
      HERALD_IP_CONNECT_RATE: "0",
      HERALD_STATE_DIR: this.stateDir,
      ...this.env,
    });
    this.proc = spawn(HERALD, ["serve"], { env, stdio: ["ignore", "ignore", process.env.HERALD_TEST_GATEWAY_LOGS ? "inherit" : "ignore"] });
    const exited = once(this.proc, "exit");
    const deadline = Date.now() + 20000;
    while (Date.now() < deadline) {
      if (this.proc.exitCode !== null) throw new Error(`herald serve exited with ${this.proc.exitCode}`);
      if (await portOpen(this.port)) return;
      await Promise.race([sleep(50), exited]);
    }
    throw new Error("herald serve did not start");
  }

  signal(sig) {
    if (this.proc && this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill(sig);
  }

  async stop() {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    const exited = once(proc, "exit");
    proc.kill("SIGKILL");
    await exited;
  }

  /** POST with the API key; returns {status, body}. */
  async post(path, body, headers = {}) {
    const res = await fetch(this.url + path, {
      method: "POST",
      headers: { Authorization: `apikey ${API_KEY}`, "Content-Type": "application/json", ...headers },
      body: JSON.stringify(body),
    });
    return { status: res.status, body: await res.json() };
  }
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Wait until `predicate()` is truthy (bounded); returns its value. */
export async function until(predicate, { timeoutMs = 10000, what = "condition" } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** The error `promise` rejects with; fails the test if it resolves. */
export async function rejection(promise) {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  assert.fail("expected the promise to reject");
}
