"""Job callbacks: when a job with a `callback_url` ends (done, failed or cancelled), its status
JSON is POSTed there, signed, and retried with backoff for a bounded time.

Signatures follow Standard Webhooks (standardwebhooks.com), so a receiver can verify them with
that project's libraries or a few lines of its own:
- headers `webhook-id` (the same on every attempt of one delivery), `webhook-timestamp` (Unix
  seconds, of this attempt) and `webhook-signature: v1,<base64 HMAC-SHA256>`;
- the HMAC is of `f"{webhook-id}.{webhook-timestamp}.".encode() + body`, keyed by the secret's
  bytes: the base64 after `whsec_`;
- the secret is the operator's `webhook_secret`, or for a job created with an API key,
  `key_secret(api_key)`, which that key's holder computes themselves.

`Sender` runs in the job store's actor: a thread that makes the attempts, its outcomes reported
back to the store (`JobStore.delivered`), which keeps them in the job's record.
"""
import base64
import hashlib
import heapq
import hmac
import json
import logging
import threading
import time
import typing as tp

from .url_fetch import UrlFetchError, UrlRefusedError, networks, post

logger = logging.getLogger(__name__)
SECRET_PREFIX = "whsec_"
KEY_CONTEXT = b"serve_graph webhook"
MAX_BACKOFF_S = 300.


def key_secret(api_key: str) -> str:
    """The signing secret of the jobs of `api_key`: `whsec_` + base64(HMAC-SHA256(key=api_key,
    msg="serve_graph webhook"))."""
    digest = hmac.new(api_key.encode(), KEY_CONTEXT, hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(digest).decode()


def secret_bytes(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret; ValueError when it is not one."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret has the form {SECRET_PREFIX}<base64>")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except ValueError:
        raise ValueError("the webhook secret after whsec_ is not base64") from None
    if len(key) < 16:
        raise ValueError("the webhook secret is shorter than 16 bytes")
    return key


def signed_headers(secret: str, message_id: str, body: bytes,
                   timestamp: tp.Optional[int] = None) -> tp.Dict[str, str]:
    """The Standard Webhooks headers of `body` for one attempt."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    signed = f"{message_id}.{timestamp}.".encode() + body
    signature = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": "v1," + base64.b64encode(signature).decode()}


def backoff_s(attempt: int) -> float:
    """Seconds before attempt `attempt + 1` (1, 2, 4... at most MAX_BACKOFF_S)."""
    return min(2. ** attempt, MAX_BACKOFF_S)


class Delivery(tp.NamedTuple):
    """One callback to make: the job's status JSON to `url`, until `give_up_at` (Unix s)."""
    job_id: str
    message_id: str
    url: str
    secret: str
    body: bytes
    give_up_at: float


Report = tp.Callable[[str, dict, str], None]  # (job_id, attempt record, state)


class Sender:
    """Makes the attempts of every delivery queued (`queue`) on one thread, in order of when
    each is due; `report(job_id, attempt, state)` hears of each attempt, `state` "pending"
    (another attempt follows), "delivered" (a 2xx) or "failed" (refused, or out of time)."""

    def __init__(self, report: Report, timeout_s: float, allow: tp.Sequence[str] = ()):
        self.report, self.timeout_s, self.allow = report, timeout_s, networks(allow)
        self._due: tp.List[tp.Tuple[float, int, Delivery, int]] = []
        self._order = 0
        self._wake = threading.Condition()
        threading.Thread(target=self._run, name="webhooks", daemon=True).start()

    def queue(self, delivery: Delivery, attempts_made: int = 0, at: float = 0.) -> None:
        """Make `delivery`'s next attempt (its `attempts_made + 1`-th) at Unix time `at`."""
        with self._wake:
            self._order += 1
            heapq.heappush(self._due, (at, self._order, delivery, attempts_made))
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due or self._due[0][0] > time.time():
                    self._wake.wait(None if not self._due else self._due[0][0] - time.time())
                _, _, delivery, made = heapq.heappop(self._due)
            try:
                self._attempt(delivery, made)
            except Exception:  # noqa: BLE001 - a report that failed: the thread goes on
                logger.exception("webhook attempt for job %s", delivery.job_id)

    def _attempt(self, delivery: Delivery, made: int) -> None:
        started = time.time()
        record = {"at": round(started, 3), "attempt": made + 1}
        try:
            headers = signed_headers(delivery.secret, delivery.message_id, delivery.body)
        except ValueError as exc:  # no secret any more (the configuration changed): stop
            record["error"] = f"cannot sign: {exc}"
            return self.report(delivery.job_id, record, "failed")
        try:
            status = post(delivery.url, delivery.body, headers, self.timeout_s, self.allow)
            record["status"] = status
        except UrlRefusedError as exc:  # the host now resolves somewhere refused: stop
            record["error"] = exc.detail
            return self.report(delivery.job_id, record, "failed")
        except (UrlFetchError, OSError) as exc:
            record["error"] = getattr(exc, "detail", None) or repr(exc)[:300]
        record["seconds"] = round(time.time() - started, 3)
        if 200 <= record.get("status", 0) < 300:
            return self.report(delivery.job_id, record, "delivered")
        next_at = time.time() + backoff_s(made)
        if next_at > delivery.give_up_at:
            return self.report(delivery.job_id, record, "failed")
        self.report(delivery.job_id, record, "pending")
        self.queue(delivery, made + 1, next_at)


def body_of(view: dict) -> bytes:
    """The bytes POSTed: the job's status JSON."""
    return json.dumps(view, separators=(",", ":"), sort_keys=True).encode()
