"""Signed URLs of a job's files (`serve_graph.signed_urls`): a signature opens its own path,
as its own key, until it expires, and only while its key is configured."""
import time
from urllib.parse import parse_qsl, urlsplit

import pytest

from serve_graph.signed_urls import SignatureError, signed, signing_key

PATH = "/jobs/" + "ab" * 16 + "/stems/vocals"
KEYS = ["key-one", "key-two"]


def query_of(url: str) -> dict:
    return dict(parse_qsl(urlsplit(url).query))


def test_a_signed_url_opens_its_path_as_its_key():
    url = signed(PATH, KEYS[1])
    assert urlsplit(url).path == PATH
    assert signing_key(PATH, query_of(url), KEYS) == KEYS[1]
    assert "key-two" not in url  # the key's id, a hash, never the key


def other(character: str) -> str:
    """A character that is not `character`: the signature changed, whatever it ended with
    (it ends with "0" one time in sixteen)."""
    return "1" if character == "0" else "0"


@pytest.mark.parametrize("change, reason", [
    (lambda q: {**q, "signature": q["signature"][:-1] + other(q["signature"][-1])},
     "not valid"),
    (lambda q: {**q, "expires": str(int(q["expires"]) + 60)}, "not valid"),  # stretched
    (lambda q: {**q, "key": "0" * 16}, "not valid"),
    (lambda q: {k: v for k, v in q.items() if k != "expires"}, "carries expires"),
    (lambda q: {**q, "expires": "soon"}, "carries expires"),
])
def test_an_altered_signed_url_is_refused(change, reason):
    query = query_of(signed(PATH, KEYS[0]))
    with pytest.raises(SignatureError, match=reason):
        signing_key(PATH, change(query), KEYS)


def test_a_signature_opens_no_other_path_expires_and_goes_with_its_key():
    query = query_of(signed(PATH, KEYS[0]))
    with pytest.raises(SignatureError, match="not valid"):
        signing_key(PATH.replace("vocals", "drums"), query, KEYS)
    with pytest.raises(SignatureError, match="not valid"):  # the key revoked
        signing_key(PATH, query, KEYS[1:])
    past = query_of(signed(PATH, KEYS[0], expires=int(time.time()) - 1))
    with pytest.raises(SignatureError, match="expired"):
        signing_key(PATH, past, KEYS)
    assert signing_key(PATH, past, KEYS, now=time.time() - 10) == KEYS[0]
