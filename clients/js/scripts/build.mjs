// Builds dist/ (run by `npm ci` through `prepare`, and by `npm test`).
//
// dist/index.js is gateway/static/client.js byte for byte: the gateway serves
// that file at /client.js and this package ships the same bytes, so the two
// cannot drift. It is copied (not symlinked) because npm pack leaves symlinks
// out and the gateway's Docker image holds only gateway/. The React bindings
// are TypeScript (src/react.tsx), compiled by tsc next to it.
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
export const SERVED = join(root, "..", "..", "gateway", "static", "client.js");
const dist = join(root, "dist");

rmSync(dist, { recursive: true, force: true });
mkdirSync(dist);
copyFileSync(SERVED, join(dist, "index.js"));
copyFileSync(join(root, "src", "index.d.ts"), join(dist, "index.d.ts"));
execFileSync(process.execPath, [join(root, "node_modules", "typescript", "bin", "tsc"), "-p", join(root, "tsconfig.build.json")], { stdio: "inherit" });
