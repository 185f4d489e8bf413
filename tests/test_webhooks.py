"""Webhook signing and delivery without Ray: signatures as the Standard Webhooks library
verifies them, the secrets, and the sender's retries against a real receiver on 127.0.0.1."""
import base64
import time

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from serve_graph.webhooks import (Delivery, Sender, backoff_s, body_of, key_secret,
                                  secret_bytes, signed_headers)
from web_servers import Receiver

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def test_signatures_verify_with_the_standard_webhooks_library():
    body = body_of({"id": "j1", "status": "done"})
    headers = signed_headers(SECRET, "j1-done", body)
    assert Webhook(SECRET).verify(body, headers) == {"id": "j1", "status": "done"}
    for tampered in (body + b" ", body.replace(b"done", b"fail")):
        with pytest.raises(WebhookVerificationError):
            Webhook(SECRET).verify(tampered, headers)
    other = "whsec_" + base64.b64encode(b"another secret of thirty-two b.").decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)


def test_an_old_signature_is_refused_by_the_receiver():
    """The timestamp is signed: a replayed delivery from an hour ago does not verify."""
    body = body_of({"id": "j1"})
    headers = signed_headers(SECRET, "j1-done", body, timestamp=int(time.time()) - 3600)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body, headers)


def test_a_keys_secret_is_derived_from_it_and_differs_per_key():
    first, second = key_secret("key-one"), key_secret("key-two")
    assert first.startswith("whsec_") and first != second and key_secret("key-one") == first
    assert len(secret_bytes(first)) == 32
    assert "key-one" not in first


@pytest.mark.parametrize("bad", ["no-prefix", "whsec_not base64!", "whsec_" + "QUJD"])
def test_malformed_secrets_are_refused(bad):
    with pytest.raises(ValueError):
        secret_bytes(bad)


def test_backoff_doubles_up_to_its_cap():
    assert [backoff_s(n) for n in range(4)] == [1, 2, 4, 8]
    assert backoff_s(30) == 300


def test_the_sender_retries_until_a_2xx_and_reports_every_attempt():
    receiver = Receiver(failures={"/hook": 2})
    reports = []
    try:
        sender = Sender(lambda *report: reports.append(report), timeout_s=2,
                        allow=["127.0.0.1/32"])
        body = body_of({"id": "j2", "status": "failed"})
        sender.queue(Delivery("j2", "j2-failed", receiver.url + "/hook", SECRET, body,
                              time.time() + 30))
        calls = receiver.wait_for("/hook", 3, timeout=20)
        deadline = time.monotonic() + 10
        while len(reports) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        receiver.close()
    assert [(job, attempt["status"], state) for job, attempt, state in reports] == [
        ("j2", 500, "pending"), ("j2", 500, "pending"), ("j2", 204, "delivered")]
    assert [attempt["attempt"] for _, attempt, _ in reports] == [1, 2, 3]
    assert all(Webhook(SECRET).verify(body, headers) for _, _, headers, body in calls)


def test_the_sender_gives_up_at_its_deadline_a_refused_address_or_no_secret():
    reports = []
    sender = Sender(lambda *report: reports.append(report), timeout_s=1)
    body = body_of({"id": "j3"})
    sender.queue(Delivery("j3", "j3-done", "http://127.0.0.1:9/hook", SECRET, body,
                          time.time() + 30))  # loopback, not allow-listed: refused
    sender.queue(Delivery("j4", "j4-done", "http://unresolvable.invalid/hook", SECRET, body,
                          time.time() + 0.5))  # an error, and no time for a second attempt
    sender.queue(Delivery("j5", "j5-done", "http://example.com/hook", "", body,
                          time.time() + 30))  # no secret to sign with (configuration changed)
    deadline = time.monotonic() + 10
    while len(reports) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    states = {job: (state, attempt) for job, attempt, state in reports}
    assert states["j3"][0] == "failed" and "loopback" in states["j3"][1]["error"]
    assert states["j4"][0] == "failed" and "resolve" in states["j4"][1]["error"]
    assert states["j5"][0] == "failed" and "cannot sign" in states["j5"][1]["error"]
    assert len(reports) == 3
