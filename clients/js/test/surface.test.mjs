// The package is the gateway's /client.js, typed by src/index.d.ts: fail when
// they part ways (a runtime export, option or stat without a declaration).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import * as client from "../dist/index.js";

const served = readFileSync(new URL("../../../gateway/static/client.js", import.meta.url), "utf8");
const built = readFileSync(new URL("../dist/index.js", import.meta.url), "utf8");
const types = readFileSync(new URL("../src/index.d.ts", import.meta.url), "utf8");

function block(name) {
  const start = types.indexOf(`export interface ${name} {`);
  assert.ok(start >= 0, `no interface ${name}`);
  return types.slice(start, types.indexOf("\n}", start));
}

test("dist/index.js is the file the gateway serves", () => {
  assert.equal(built, served);
});

test("every runtime export is declared", () => {
  for (const name of Object.keys(client)) {
    if (name === "default") continue;
    assert.match(types, new RegExp(`export declare (const|class|function) ${name}\\b`), name);
  }
});

test("every option and stat is declared", () => {
  const c = new client.HeraldClient({ url: "http://127.0.0.1:1" });
  const options = block("HeraldOptions");
  for (const key of Object.keys(c.options)) assert.match(options, new RegExp(`\\b${key}\\?:`), key);
  const stats = block("HeraldStats");
  for (const key of Object.keys(c.stats)) assert.match(stats, new RegExp(`\\b${key}:`), key);
  for (const state of client.STATES) assert.ok(types.includes(`"${state}"`), state);
});
