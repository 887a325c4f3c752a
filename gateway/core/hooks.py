"""Backend hooks: Herald asks the application's backend over HTTP (docs/hooks.md).

Five hooks, each optional (on when its path is configured): `connect`,
`refresh`, `subscribe`, `publish` (client publish) and `rpc`. A call is one
`POST` of a JSON object to `HERALD_HOOK_URL` + the hook's path; the backend
answers `{"result": ...}` or `{"error": {"code", "message"}}`.

A backend is an outside dependency that can be slow, down or wrong, and a
client must never wait on it forever or take its neighbours down with it:

- every call has a timeout (`HERALD_HOOK_TIMEOUT`);
- at most `HERALD_HOOK_CONCURRENCY` calls per hook are in flight; one more is
  refused at once (`unavailable`) rather than queued, so a stalled backend
  costs a bounded number of sockets and no memory growth;
- a circuit breaker per hook opens after `HERALD_HOOK_BREAKER_FAILURES`
  consecutive failures (timeout, 5xx, malformed reply, unreachable) and
  refuses calls for `HERALD_HOOK_BREAKER_COOLDOWN` seconds, then lets one
  trial call through (half-open): success closes it, failure re-opens it.

Every failure reaches the client as `unavailable` with a message saying
which (the backend's own rejection reaches it with the backend's code), and
every call is counted in `herald_hook_requests_total{hook,outcome}`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Final, get_args

import orjson
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from gateway.config import ConfigError, Settings
from gateway.protocol.errors import ErrorCode, ProtocolError
from gateway.telemetry import tracing

HOOKS: Final = ("connect", "refresh", "subscribe", "publish", "rpc")
# A rejection may carry any protocol error code; a longer message is cut.
REJECT_CODES: Final = frozenset(get_args(ErrorCode))
MAX_MESSAGE_CHARS: Final = 512
# The largest backend reply read; a bigger one is malformed, not buffered.
MAX_REPLY_BYTES: Final = 1024 * 1024
SIGNATURE_HEADER: Final = "X-Herald-Signature"

# Outcomes, the `outcome` label of herald_hook_requests_total.
OK, REJECTED = "ok", "rejected"
TIMEOUT, ERROR, MALFORMED = "timeout", "error", "malformed"
OVERLOADED, CIRCUIT_OPEN = "overloaded", "circuit_open"


class Breaker:
    """A circuit breaker: closed, open for a cool-down, then half-open for one trial.

    Pure state and an injectable clock, so its decisions are tested directly.
    """

    def __init__(
        self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self._clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self._trial = False  # a half-open trial call is in flight

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        if self._clock() - self.opened_at < self.cooldown:
            return "open"
        return "half_open"

    def allow(self) -> bool:
        """May a call go out now? In half-open, only one at a time (the trial)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._trial:
            self._trial = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self._trial = False

    def abandoned(self) -> None:
        """A call ended without an answer either way (its caller was cancelled): it
        says nothing about the backend, but a half-open trial slot is freed so the
        next call can be the trial."""
        self._trial = False

    def failure(self) -> None:
        self._trial = False
        self.failures += 1
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = self._clock()


class HookFailed(ProtocolError):
    """The backend could not answer (as opposed to answering no): `unavailable`."""

    def __init__(self, hook: str, outcome: str, detail: str) -> None:
        super().__init__("unavailable", f"{hook} hook {detail}")
        self.outcome = outcome


def hook_urls(settings: Settings) -> dict[str, str]:
    """The configured hooks and their full URLs (a hook is on when its path is set)."""
    if not settings.hook_url:
        return {}
    base = settings.hook_url.rstrip("/")
    urls = {}
    for hook in HOOKS:
        path = getattr(settings, f"hook_{hook}_path")
        if path:
            urls[hook] = base + "/" + path.lstrip("/")
    return urls


def parse_reply(hook: str, status: int, body: bytes) -> Any:
    """The `result` of a backend reply; raises its rejection, or `HookFailed`.

    Pure, so every malformed shape is tested without a network.
    """
    if status >= 500:
        raise HookFailed(hook, ERROR, f"failed: backend answered HTTP {status}")
    if status != 200:
        raise HookFailed(hook, MALFORMED, f"misconfigured: backend answered HTTP {status}")
    if len(body) > MAX_REPLY_BYTES:
        raise HookFailed(hook, MALFORMED, f"reply over {MAX_REPLY_BYTES} bytes")
    try:
        reply = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise HookFailed(hook, MALFORMED, "reply is not JSON") from None
    if not isinstance(reply, dict) or ("result" in reply) == ("error" in reply):
        raise HookFailed(hook, MALFORMED, "reply must be an object with 'result' or 'error'")
    if "result" in reply:
        return reply["result"]
    error = reply["error"]
    if not isinstance(error, dict) or error.get("code") not in REJECT_CODES:
        raise HookFailed(hook, MALFORMED, "error must be {code: <protocol error code>, message}")
    message = error.get("message")
    if not isinstance(message, str) or not message:
        message = f"refused by the {hook} hook"
    raise ProtocolError(error["code"], message[:MAX_MESSAGE_CHARS])


def result_object(hook: str, result: Any, fields: dict[str, type | tuple[type, ...]]) -> dict:
    """A hook's `result` as an object whose known fields have the right types."""
    if result is None:
        return {}
    if not isinstance(result, dict):
        raise HookFailed(hook, MALFORMED, "result must be an object")
    for name, kind in fields.items():
        if name in result and not isinstance(result[name], kind):
            raise HookFailed(hook, MALFORMED, f"result.{name} has the wrong type")
    return result


class _Hook:
    """One hook's URL, in-flight count and breaker."""

    def __init__(self, name: str, url: str, settings: Settings) -> None:
        self.name = name
        self.url = url
        self.in_flight = 0
        self.breaker = Breaker(settings.hook_breaker_failures, settings.hook_breaker_cooldown)


class Hooks:
    """The HTTP client of every configured hook, with its limits and figures."""

    def __init__(self, settings: Settings, metrics: Any) -> None:
        self._settings = settings
        self._metrics = metrics
        urls = hook_urls(settings)
        self._hooks = {name: _Hook(name, url, settings) for name, url in urls.items()}
        self._secret = settings.hook_secret.encode()
        self._client: AsyncHTTPClient | None = None
        if self._hooks:
            _require_curl()

    def enabled(self, hook: str) -> bool:
        return hook in self._hooks

    def breaker_state(self, hook: str) -> str:
        return self._hooks[hook].breaker.state

    def _http(self) -> AsyncHTTPClient:
        if self._client is None:
            from tornado.curl_httpclient import CurlAsyncHTTPClient

            # libcurl keeps connections to the backend alive between calls (a
            # call costs about a fifth of a fresh connection's time); its own
            # instance, sized by our in-flight bound, not a shared one's 10.
            self._client = CurlAsyncHTTPClient(
                force_instance=True, max_clients=self._settings.hook_concurrency * len(HOOKS)
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def call(
        self, hook: str, request: dict[str, Any], check: Callable[[Any], Any] | None = None
    ) -> Any:
        """POST `request` to the hook; its `result` (through `check`, which reads
        the hook's fields), its rejection, or `HookFailed`.

        A result `check` refuses is `malformed` like any other bad reply: counted
        so, and a failure for the breaker.
        """
        h = self._hooks[hook]
        # The bound first: a half-open breaker's one trial must be a call that goes out.
        if h.in_flight >= self._settings.hook_concurrency:
            return self._count(
                hook, OVERLOADED, HookFailed(hook, OVERLOADED, "overloaded: too many calls")
            )
        if not h.breaker.allow():
            return self._count(hook, CIRCUIT_OPEN, HookFailed(hook, CIRCUIT_OPEN, "circuit open"))
        h.in_flight += 1
        started = time.perf_counter()
        try:
            result = await self._post(h, request)
            if check is not None:
                result = _checked(hook, check, result)
        except HookFailed as exc:
            h.breaker.failure()
            return self._count(hook, exc.outcome, exc)
        except ProtocolError as exc:
            h.breaker.success()  # the backend answered: it is up
            return self._count(hook, REJECTED, exc)
        except BaseException:
            h.breaker.abandoned()  # cancelled: never leave a half-open trial pending
            raise
        finally:
            h.in_flight -= 1
            self._metrics.hook_duration.labels(hook).observe(time.perf_counter() - started)
        h.breaker.success()
        self._metrics.hook_requests.labels(hook, OK).inc()
        return result

    def _count(self, hook: str, outcome: str, exc: ProtocolError) -> Any:
        self._metrics.hook_requests.labels(hook, outcome).inc()
        raise exc

    async def _post(self, h: _Hook, request: dict[str, Any]) -> Any:
        body = orjson.dumps({"hook": h.name, **request})
        headers = {"Content-Type": "application/json", "X-Herald-Hook": h.name}
        if self._secret:
            digest = hmac.new(self._secret, body, hashlib.sha256).hexdigest()
            headers[SIGNATURE_HEADER] = f"sha256={digest}"
        span = tracing.client_span("POST", h.url, headers) if tracing.enabled else nullcontext()
        timeout = self._settings.hook_timeout
        try:
            with span:  # puts `traceparent` in the headers when tracing is on
                req = HTTPRequest(
                    h.url, method="POST", body=body, headers=headers,
                    connect_timeout=timeout, request_timeout=timeout, follow_redirects=False,
                    prepare_curl_callback=_limit_reply,
                )
                response = await self._http().fetch(req, raise_error=False)
        except HTTPClientError as exc:  # raise_error=False still raises on timeouts
            raise _transport_failure(h.name, exc) from None
        except OSError as exc:
            raise HookFailed(h.name, ERROR, f"unreachable: {exc.strerror or exc}") from None
        if response.code == 599:
            raise _transport_failure(h.name, response.error)
        return parse_reply(h.name, response.code, response.body or b"")


def _require_curl() -> None:
    """Hooks need pycurl (a dependency); say so at start-up, not at the first call."""
    try:
        import pycurl  # noqa: F401
    except ImportError:
        raise ConfigError("backend hooks need pycurl: pip install -e .") from None


def _limit_reply(curl: Any) -> None:
    """libcurl stops reading a reply past the bound instead of buffering it."""
    import pycurl

    curl.setopt(pycurl.MAXFILESIZE, MAX_REPLY_BYTES + 1)


def _checked(hook: str, check: Callable[[Any], Any], result: Any) -> Any:
    try:
        return check(result)
    except HookFailed:
        raise
    except ProtocolError as exc:  # e.g. a channel name that does not validate
        raise HookFailed(hook, MALFORMED, f"sent a bad result: {exc.message}") from None


def _transport_failure(hook: str, exc: BaseException | None) -> HookFailed:
    """Tornado's code 599: a timeout, or the backend unreachable."""
    text = str(exc or "")
    if "Timeout" in text or "timed out" in text.lower():
        return HookFailed(hook, TIMEOUT, "timed out")
    if "Maximum file size" in text:  # libcurl's MAXFILESIZE (_limit_reply)
        return HookFailed(hook, MALFORMED, f"reply over {MAX_REPLY_BYTES} bytes")
    return HookFailed(hook, ERROR, f"unreachable: {text or 'connection failed'}")
