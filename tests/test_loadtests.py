"""The Locust load tests (loadtests/) run for real against a real gateway process.

Each scenario runs headless for a few seconds against `herald serve` in its
own process (Locust is gevent; the gateway must not share its process), and
the assertions read Locust's own CSV report: messages delivered, latency
recorded, zero offsets lost. The checks are shown to fail runs they must
fail (an impossible p99, messages that never arrived) and bad options to
get clear errors. The offset bookkeeping itself is tested directly.

Latency thresholds are set out of reach here (`--check-p99-ms 60000`):
tests assert behaviour, never timing.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from loadtests.herald_load.options import ConfigError, ws_url_from
from loadtests.herald_load.tracker import OffsetTracker, Verdict
from tests.conftest import API_KEY, SECRET, RedisProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"

RUN_SECONDS = "3s"
NO_TIMING = ["--check-p99-ms", "60000", "--check-connect-p99-ms", "60000"]


# -- the gateway under test ----------------------------------------------------


class Gateway:
    """`herald serve` in its own process on a free port, on the given Redis."""

    def __init__(self, tmp: Path, redis_url: str) -> None:
        port = free_port()
        env = {
            **os.environ,
            "HERALD_HOST": "127.0.0.1",
            "HERALD_PORT": str(port),
            "HERALD_JWT_SECRET": SECRET,
            "HERALD_API_KEY": API_KEY,
            "HERALD_DEMO": "false",
            "HERALD_STATE_DIR": str(tmp / "state"),
            "HERALD_LOG_LEVEL": "WARNING",
            # The deployment's shape: a real redis-server behind the gateway.
            "HERALD_REDIS_URL": redis_url,
            # All load comes from 127.0.0.1 as a handful of users: no per-IP or per-user cap.
            "HERALD_IP_CONNECT_RATE": "0",
            "HERALD_MAX_CONNECTIONS_PER_USER": "0",
        }
        tmp.mkdir(parents=True, exist_ok=True)
        self.log_path = tmp / "gateway.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve"], env=env, stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"herald serve did not become ready:\n{self.log_path.read_text()}")
            time.sleep(0.1)
        auth = {"Authorization": f"apikey {API_KEY}"}
        stats = urllib.request.Request(self.url + "/api/v1/stats", headers=auth)
        with urllib.request.urlopen(stats, timeout=5) as reply:
            assert orjson.loads(reply.read())["engine"] == "RedisBroker"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def herald(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[str]:
    """One gateway for the module; yields its base URL."""
    gw = Gateway(tmp_path_factory.mktemp("herald"), request.getfixturevalue("redis_process").url)
    yield gw.url
    gw.stop()


# -- running Locust --------------------------------------------------------------


@dataclass
class Run:
    returncode: int
    output: str
    rows: list[dict[str, str]]

    def row(self, kind: str, name: str) -> dict[str, str] | None:
        return next((r for r in self.rows if r["Type"] == kind and r["Name"] == name), None)

    def count(self, kind: str, name: str) -> int:
        row = self.row(kind, name)
        return int(row["Request Count"]) if row else 0

    def of_type(self, kind: str) -> list[dict[str, str]]:
        return [r for r in self.rows if r["Type"] == kind]


def locust(
    host: str,
    tmp: Path,
    *args: str,
    secret: str | None = SECRET,
    users: str = "11",
    seconds: str = RUN_SECONDS,
    during: Callable[[], None] | None = None,
) -> Run:
    """Run the locustfile headless; returns exit code, output and the stats CSV rows.

    `during`, if given, runs in this thread while Locust runs (a fault to inject).
    """
    prefix = tmp / "run"
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--host", host, "--api-key", API_KEY, "-u", users, "-r", "100", "-t", seconds,
        "--csv", str(prefix), "--html", str(tmp / "report.html"), "--only-summary",
        "--prefix", f"lt{time.monotonic_ns() % 10**9}",
        *args,
    ]  # fmt: skip
    if secret is not None:
        command += ["--jwt-secret", secret]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERALD_", "LOCUST_"))}
    with subprocess.Popen(
        command, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        try:
            if during is not None:
                during()
            output, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()
    stats = Path(f"{prefix}_stats.csv")
    rows = list(csv.DictReader(stats.open())) if stats.exists() else []
    return Run(proc.returncode, output, rows)


def assert_clean_delivery(run: Run) -> None:
    """Delivered, timed, nothing lost or repeated, no failure of any kind."""
    assert run.returncode == 0, run.output
    delivers = run.of_type("deliver")
    assert delivers and sum(int(r["Request Count"]) for r in delivers) > 0, run.output
    for row in delivers:
        assert float(row["Average Response Time"]) > 0, row  # latency from sent_at
        assert row["99%"] not in ("", "N/A"), row
    assert run.count("check", "lost") == 0
    assert run.count("check", "duplicate") == 0
    total = run.row("", "Aggregated")
    assert total is not None and total["Failure Count"] == "0", run.output
    assert "Herald checks PASSED" in run.output


# -- each scenario ---------------------------------------------------------------


def test_storm_every_connection_opens_and_hears_the_broadcast(herald: str, tmp_path: Path) -> None:
    run = locust(herald, tmp_path, "--scenario", "storm", *NO_TIMING, users="41")
    assert_clean_delivery(run)
    assert run.count("ws", "connect") == 40  # 41 users = 40 viewers + 1 publisher
    assert run.row("deliver", "metrics") is not None
    assert "PASS p99 connect" in run.output  # storm checks connect p99 by default


def test_fanout_delivers_job_progress_to_every_viewer(herald: str, tmp_path: Path) -> None:
    run = locust(
        herald, tmp_path, "--scenario", "fanout", "--jobs", "3", "--rate", "5", *NO_TIMING,
        users="13",
    )
    assert_clean_delivery(run)
    assert "deliver" in (tmp_path / "report.html").read_text()  # the HTML report has our rows
    assert run.count("POST", "register job") >= 3
    assert run.count("ws", "subscribe job:") == 12
    # 4 viewers per job, each publication delivered at most once to each of them.
    assert 0 < run.count("deliver", "progress") <= 4 * run.count("POST", "publish job:")


def test_broadcast_selected_by_tag(herald: str, tmp_path: Path) -> None:
    run = locust(herald, tmp_path, "--tags", "broadcast", "--rate", "5", *NO_TIMING, users="16")
    assert_clean_delivery(run)
    assert run.count("ws", "subscribe public:") == 15
    assert run.row("deliver", "metrics") is not None  # the broadcast publisher's event
    assert run.row("deliver", "progress") is None


def test_churn_resumes_with_since_and_loses_nothing(herald: str, tmp_path: Path) -> None:
    run = locust(
        herald, tmp_path, "--scenario", "churn", "--jobs", "2", "--rate", "10",
        "--churn-interval", "0.5", *NO_TIMING,
    )
    assert_clean_delivery(run)
    resumed = run.count("ws", "resubscribe job:")
    assert resumed > 0  # viewers reconnected and resubscribed with `since`
    assert run.count("ws", "connect") >= 10 + resumed  # 10 first connects, one per resume


def test_slow_consumers_do_not_cost_normal_viewers_a_message(herald: str, tmp_path: Path) -> None:
    run = locust(
        herald, tmp_path, "--scenario", "slow", "--jobs", "2", "--rate", "20",
        "--slow-ratio", "0.3", "--slow-delay", "0.05", *NO_TIMING,
    )
    assert_clean_delivery(run)
    assert run.count("deliver", "progress") > 0
    assert run.count("deliver-slow", "progress") > 0  # slow ones report on their own rows


def test_soak_mixes_steady_viewers_and_churn(herald: str, tmp_path: Path) -> None:
    run = locust(
        herald, tmp_path, "--scenario", "soak", "--jobs", "2", "--rate", "5",
        "--churn-interval", "0.5", "--ws-auth", "message", "--token-ttl", "2",
        # A 2 s token is renewed 0.9-1.6 s after it is minted (JWT's whole
        # seconds); 4 s leave a steady viewer that connected late on a loaded
        # machine (up to 2.4 s in) time to renew before the end.
        *NO_TIMING, users="21", seconds="4s",
    )
    assert_clean_delivery(run)  # authenticated by a first `auth` frame, as browsers do
    assert run.count("ws", "resubscribe job:") > 0
    # 2-second tokens outlived: renewed in place, never a token_expired close.
    assert run.count("ws", "refresh token") > 0
    assert run.row("ws", "error token_expired") is None


def test_a_gateway_killed_for_good_fails_the_run_on_lost_counting_every_viewer(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Viewers on gateway B, publisher and position reads on gateway A, one Redis;
    B is SIGKILLed mid-run and never comes back. The viewers, disconnected at the
    end, still count what they were owed: the run fails on `lost`, and the count
    is published x viewers - delivered, less only what was published before each
    viewer had subscribed (a publication or two of the first moment: under 1 %
    of what is owed after 6 s without B; 98 % is asserted, as a loaded machine
    subscribes later).
    """
    redis_url = request.getfixturevalue("redis_process").url
    a = Gateway(tmp_path / "a", redis_url)
    b = Gateway(tmp_path / "b", redis_url)
    viewers = 5
    try:
        def kill_b() -> None:
            # Once every viewer is subscribed on B (bounded), then for good.
            auth = {"Authorization": f"apikey {API_KEY}"}
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                stats = urllib.request.Request(b.url + "/api/v1/stats", headers=auth)
                with urllib.request.urlopen(stats, timeout=5) as reply:
                    if orjson.loads(reply.read())["subscriptions"] >= 2 * viewers:
                        break  # each viewer: its user: channel and the job
                time.sleep(0.05)
            time.sleep(0.5)
            b.proc.kill()

        run = locust(
            a.url, tmp_path, "--scenario", "fanout", "--jobs", "1", "--rate", "40",
            "--ws-url", b.url.replace("http", "ws") + "/ws", "--drain-timeout", "2",
            *NO_TIMING, users=str(viewers + 1), seconds="7s", during=kill_b,
        )
    finally:
        a.stop()
        b.stop()
    assert run.returncode != 0, run.output
    assert "FAIL lost" in run.output, run.output
    lost = run.count("check", "lost")
    published = run.count("POST", "publish job:")
    delivered = run.count("deliver", "progress")
    owed = published * viewers - delivered
    print(f"\nkilled gateway: published={published} viewers={viewers} delivered={delivered} "
          f"owed={owed} lost={lost}")
    assert run.row("POST", "publish job:")["Failure Count"] == "0"  # the publisher's side: none
    assert owed > 100 and lost > 0, run.output
    assert owed * 0.98 <= lost <= owed, (lost, published, delivered)
    assert "disconnected at the end" in run.output  # which side missed it, and why
    assert "publisher side: 0 of" in run.output  # the summary says the viewers missed it


def test_an_unreadable_position_fails_the_run_rather_than_counting_no_loss(
    herald: str, tmp_path: Path
) -> None:
    """Viewers on a live gateway, --host (publishing, position reads) on a dead port:
    with every other check relaxed, the unread positions alone fail the run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    run = locust(
        dead, tmp_path, "--scenario", "broadcast", "--ws-url", herald.replace("http", "ws") + "/ws",
        "--check-fail-ratio", "1", "--check-min-delivered", "0", *NO_TIMING, users="3",
    )
    assert run.returncode != 0, run.output
    assert "FAIL positions read" in run.output, run.output
    assert "PASS lost" in run.output  # nothing judged lost: it is the read that fails


def test_direct_redis_publisher_feeds_the_gateway(
    herald: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """--publish-via redis: Herald's RedisPublisher in a child process, no HTTP hop."""
    redis: RedisProcess = request.getfixturevalue("redis_process")
    run = locust(
        herald, tmp_path, "--scenario", "fanout", "--jobs", "2", "--rate", "10",
        "--publish-via", "redis", "--redis-url", redis.url, *NO_TIMING,
    )
    assert_clean_delivery(run)
    assert run.count("REDIS", "publish job:") > 0
    assert run.count("POST", "publish job:") == 0
    assert run.count("REDIS", "start publisher") == 1


def test_redis_mode_without_url_is_a_clear_error(herald: str, tmp_path: Path) -> None:
    run = locust(herald, tmp_path, "--scenario", "fanout", "--publish-via", "redis")
    assert run.returncode != 0
    assert "--publish-via redis needs --redis-url (or HERALD_REDIS_URL)" in run.output


# -- the checks fail runs they must fail ---------------------------------------------


def test_impossible_p99_fails_the_run(herald: str, tmp_path: Path) -> None:
    run = locust(
        herald, tmp_path, "--scenario", "fanout", "--jobs", "2", "--rate", "10",
        "--check-p99-ms", "0", seconds="2s",
    )
    assert run.returncode == 1, run.output
    assert run.count("deliver", "progress") > 0  # a good run, judged by an impossible bar
    assert "FAIL p99 deliver progress" in run.output
    assert "Herald checks FAILED" in run.output


def test_lost_messages_fail_the_run(herald: str, tmp_path: Path) -> None:
    run = locust(
        herald, tmp_path, "--scenario", "fanout", "--jobs", "2", "--rate", "10",
        "--simulate-loss", "4", *NO_TIMING, seconds="2s",
    )
    assert run.returncode == 1, run.output
    lost = run.row("check", "lost")
    assert lost is not None and int(lost["Failure Count"]) == int(lost["Request Count"]) > 0
    assert "offsets missing before job:" in run.output  # a gap seen in the stream itself
    assert "FAIL lost" in run.output


def test_loss_of_the_last_messages_is_caught_at_the_end(herald: str, tmp_path: Path) -> None:
    """Viewers that drop every message never see a gap: only the drain check at the end
    (Herald's state vs what arrived) can tell, and on workers the master must wait for it."""
    run = locust(
        herald, tmp_path, "--scenario", "fanout", "--jobs", "2", "--rate", "10",
        "--simulate-loss", "1", "--drain-timeout", "1", "--processes", "2", *NO_TIMING,
        seconds="2s",
    )
    assert run.returncode == 1, run.output
    assert run.count("deliver", "progress") == 0
    assert run.count("check", "lost") > 0
    assert run.count("GET", "channel state") >= 1  # the viewers read their channels' positions
    assert "not there at the end" in run.output  # the failure says how it was found


def test_missing_secret_is_a_clear_error(herald: str, tmp_path: Path) -> None:
    run = locust(herald, tmp_path, "--scenario", "fanout", secret=None)
    assert run.returncode != 0
    assert "viewers need --jwt-secret (or HERALD_JWT_SECRET) or --token-file" in run.output


def test_unknown_scenario_is_refused(herald: str, tmp_path: Path) -> None:
    run = locust(herald, tmp_path, "--scenario", "tsunami")
    assert run.returncode == 2
    assert "invalid choice: 'tsunami'" in run.output


def test_tags_naming_no_scenario_are_refused(herald: str, tmp_path: Path) -> None:
    run = locust(herald, tmp_path, "--tags", "nonsense")
    assert run.returncode != 0
    assert "--tags nonsense names no scenario" in run.output


def test_token_file_instead_of_a_secret(herald: str, tmp_path: Path) -> None:
    from gateway.security.auth import mint_token

    tokens = tmp_path / "tokens.txt"
    tokens.write_text(
        "# one token per line\n"
        + "\n".join(mint_token(SECRET, f"file-{i}", channels=["job:*"]) for i in range(3))
    )
    run = locust(
        herald, tmp_path, "--scenario", "fanout", "--jobs", "2", "--rate", "10",
        "--token-file", str(tokens),
        *NO_TIMING, secret=None, users="5",
    )
    assert_clean_delivery(run)


# -- pieces, without a network ---------------------------------------------------------


def test_tracker_in_order_stream_is_ok() -> None:
    t = OffsetTracker()
    t.reset("job:1", "e1", 5)
    assert [t.message("job:1", "e1", o).verdict for o in (6, 7, 8)] == [Verdict.OK] * 3
    assert t.position("job:1") is not None and t.position("job:1").offset == 8


def test_tracker_counts_a_gap_as_lost() -> None:
    t = OffsetTracker()
    t.reset("job:1", "e1", 5)
    outcome = t.message("job:1", "e1", 9)
    assert (outcome.verdict, outcome.missing) == (Verdict.LOST, 3)
    assert t.message("job:1", "e1", 10).verdict is Verdict.OK


def test_tracker_flags_repeats_and_new_epochs() -> None:
    t = OffsetTracker()
    t.reset("job:1", "e1", 5)
    t.message("job:1", "e1", 6)
    assert t.message("job:1", "e1", 6).verdict is Verdict.DUPLICATE
    assert t.message("job:1", "e1", 3).verdict is Verdict.DUPLICATE
    assert t.message("job:1", "e2", 1).verdict is Verdict.EPOCH_RESET
    assert t.message("job:1", "e2", 2).verdict is Verdict.OK
    assert t.message("job:9", "e1", 1).verdict is Verdict.UNTRACKED


def test_tracker_resume_recovered_keeps_position_unrecovered_counts_loss() -> None:
    t = OffsetTracker()
    t.reset("job:1", "e1", 5)
    assert t.resumed("job:1", "e1", 20, recovered=True).verdict is Verdict.OK
    assert t.message("job:1", "e1", 6).verdict is Verdict.OK  # the replay follows
    outcome = t.resumed("job:1", "e1", 30, recovered=False)
    assert (outcome.verdict, outcome.missing) == (Verdict.LOST, 24)
    assert t.message("job:1", "e1", 31).verdict is Verdict.OK
    assert t.resumed("job:1", "e9", 2, recovered=False).verdict is Verdict.EPOCH_RESET


def test_refused_upgrade_is_one_failure_row_per_cause() -> None:
    """A 429 from Herald's per-IP connect limit reads as its code, without dates."""
    import websocket

    from loadtests.herald_load.connection import refusal

    body = b'{"error": "rate_limited", "message": "too many connection attempts", "timestamp": "t"}'
    exc = websocket.WebSocketBadStatusException(
        "Handshake status %d %s -+-+- %s -+-+- %s", 429, "Too Many Requests",
        {"date": "Sun, 22 Nov 2026 05:54:43 GMT"}, body,
    )
    assert refusal(exc) == "HTTP 429 rate_limited: too many connection attempts"
    html = websocket.WebSocketBadStatusException("%d %s %s %s", 502, "Bad Gateway", {}, b"<html>")
    assert refusal(html) == "HTTP 502"


def test_ws_url_from_host() -> None:
    assert ws_url_from("http://localhost:8080") == "ws://localhost:8080/ws"
    assert ws_url_from("https://rt.example.com/herald/") == "wss://rt.example.com/herald/ws"
    with pytest.raises(ConfigError, match="--host must be an http"):
        ws_url_from("localhost:8080")


# -- distributed: master and workers -------------------------------------------------


def test_master_with_workers_aggregates_and_judges(herald: str, tmp_path: Path) -> None:
    """`--processes 2`: a master and two worker processes, options sent by the master only."""
    run = locust(
        herald, tmp_path, "--scenario", "fanout", "--jobs", "2", "--rate", "5",
        "--processes", "2", *NO_TIMING,
    )
    assert_clean_delivery(run)
    assert run.count("ws", "connect") == 10  # viewers of both workers, counted on the master


# -- the Kubernetes manifests --------------------------------------------------------

K8S = ROOT / "loadtests" / "k8s"


def k8s_objects(overlay: str) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k loadtests/k8s/<overlay>` creates (resources only)."""

    def collect(folder: Path) -> list[dict[str, Any]]:
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        objects: list[dict[str, Any]] = []
        for entry in kustomization["resources"]:
            path = (folder / entry).resolve()
            if path.is_dir():
                objects += collect(path)
            else:
                objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
        return objects

    return collect(K8S / overlay)


@pytest.mark.parametrize("overlay", ["web", "headless"])
def test_k8s_manifests_are_valid_and_consistent(overlay: str) -> None:
    import kubernetes_validate

    objects = k8s_objects(overlay)
    kinds = sorted(o["kind"] for o in objects)
    master_kind = "Deployment" if overlay == "web" else "Job"
    assert kinds == sorted(["ConfigMap", "Service", "Deployment", master_kind])
    for obj in objects:
        kubernetes_validate.validate(obj, "1.30.0", strict=True)
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    service = by_kind[("Service", "herald-loadtest-master")]
    master_name = "herald-loadtest-master" if overlay == "web" else "herald-loadtest"
    master = by_kind[(master_kind, master_name)]
    worker = by_kind[("Deployment", "herald-loadtest-worker")]
    master_pod = master["spec"]["template"]
    # The Service reaches the master pod, and workers reach the Service.
    assert service["spec"]["selector"].items() <= master_pod["metadata"]["labels"].items()
    assert "herald-loadtest-master" in worker["spec"]["template"]["spec"]["containers"][0]["args"]
    # Both may pass the chart's NetworkPolicy (part-of + instance labels).
    for pod in (master_pod, worker["spec"]["template"]):
        assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "herald"
        assert "app.kubernetes.io/instance" in pod["metadata"]["labels"]
    # Every LOCUST_* setting in the ConfigMap is an option that exists.
    config = by_kind[("ConfigMap", "herald-loadtest")]["data"]
    known = option_env_vars() | {"LOCUST_HOST", "LOCUST_EXPECT_WORKERS", "LOCUST_USERS"}
    assert set(config) <= known, set(config) - known
    env = {e["name"] for e in master_pod["spec"]["containers"][0]["env"]}
    assert env == {"HERALD_JWT_SECRET", "HERALD_API_KEY"} <= option_env_vars()


def option_env_vars() -> set[str]:
    """The environment variable of every load-test option, as registered with Locust."""
    from loadtests.herald_load.options import add_arguments

    names: set[str] = set()

    class Recorder:
        def add_argument(self, *args: Any, env_var: str, **kwargs: Any) -> None:
            names.add(env_var)

    add_arguments(Recorder())
    return names
