// A small app on the hooks: a job's live progress bar and the connection badge.
// `npm run typecheck` checks it (strict); tests/test_react_page.py bundles it
// with esbuild and drives it in Chromium across a gateway restart.
import type { ReactNode } from "react";

import type { HeraldOptions } from "@herald/client";
import { HeraldProvider, useChannel, useHerald, useJobProgress } from "@herald/client/react";

const LABELS: Record<string, string> = {
  connecting: "Connecting…",
  connected: "Live",
  reconnecting: "Reconnecting…",
  "fallback:sse": "Live (SSE)",
  "fallback:poll": "Live (polling)",
  offline: "Offline",
  failed: "Gave up",
};

export function ConnectionBadge(): ReactNode {
  const { state, transport } = useHerald();
  return (
    <p id="connection" data-state={state} data-transport={transport ?? ""}>
      {LABELS[state] ?? state}
    </p>
  );
}

export function JobCard({ jobId, onOffset }: { jobId: string; onOffset?: (offset: number) => void }): ReactNode {
  const { progress, status, stage, message, state, error } = useJobProgress(jobId);
  // Every publication once, in order (the hook above renders only the latest).
  useChannel(`job:${jobId}`, (msg) => onOffset?.(msg.offset));
  if (error) return <div className="job" data-error={error.code}>{error.message}</div>;
  return (
    <div className="job" data-job-id={jobId} data-progress={progress} data-status={status ?? ""}>
      <strong>{status ?? "waiting"}</strong> {stage ? `· ${stage}` : ""}
      <progress max={100} value={progress} aria-label={`job ${jobId}`} />
      <span className="message">{message ?? ""}</span>
      {state === "reconnecting" ? <em className="stale"> (reconnecting)</em> : null}
    </div>
  );
}

export interface AppProps {
  options: HeraldOptions;
  jobs: string[];
  onOffset?: (jobId: string, offset: number) => void;
}

export function App({ options, jobs, onOffset }: AppProps): ReactNode {
  return (
    <HeraldProvider options={options}>
      <ConnectionBadge />
      {jobs.map((id) => (
        <JobCard key={id} jobId={id} onOffset={(offset) => onOffset?.(id, offset)} />
      ))}
    </HeraldProvider>
  );
}
