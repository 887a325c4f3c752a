// The page's entry: configuration comes from `window.heraldExample`, set by
// the hosting page (the test sets it before load, so no token is in a URL).
import { createRoot } from "react-dom/client";

import { App } from "./App.js";

interface ExampleConfig {
  url: string;
  token: string;
  jobs: string[];
  log: Array<{ job: string; offset: number }>;
}

declare global {
  interface Window {
    heraldExample: ExampleConfig;
  }
}

const config = window.heraldExample;
const root = document.getElementById("root");
if (!root) throw new Error("no #root element");
createRoot(root).render(
  <App
    options={{ url: config.url, token: config.token, backoffMaxMs: 1000, openTimeoutMs: 4000 }}
    jobs={config.jobs}
    onOffset={(job, offset) => config.log.push({ job, offset })}
  />,
);
