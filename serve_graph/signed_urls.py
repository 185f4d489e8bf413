"""Signed URLs of a finished job's files: what a browser fetches without the API key. An
`<audio src>` or `<a href download>` cannot send an `Authorization` header, so with API keys on
a web app would have to download a stem through its own server first; a signed URL it can hand
to the page instead, as S3's presigned URLs.

A signed URL is the file's path with `expires` (Unix seconds), `key` (the API key's id,
`jobs.key_id`: a hash, never the key) and `signature`: HMAC-SHA256, under a secret derived
from the API key, of `GET <path> <expires>`. It answers GETs (byte ranges included) of that
path alone, as that key, until `expires`, and only while the key is configured: revoking the
key revokes its URLs.
"""
import hashlib
import hmac
import time
import typing as tp
from urllib.parse import urlencode

from .engine.errors import SeparationError
from .jobs import key_id

SIGNED_FOR_S = 3600  # how long a signed URL answers
SIGNED_PATH = r"^/jobs/[0-9a-f]{32}/(result|stems/[^/]+)$"  # what a signature may open
CONTEXT = b"serve_graph signed url"


class SignatureError(SeparationError):
    """A signed URL that is not valid (altered, of another path or key) or has expired."""
    status_code = 401
    error = "unauthorized"


def signed(path: str, api_key: str, expires: tp.Optional[int] = None) -> str:
    """`path` signed for `api_key` until `expires` (default: SIGNED_FOR_S from now)."""
    expires = int(time.time()) + SIGNED_FOR_S if expires is None else expires
    query = {"expires": expires, "key": key_id(api_key),
             "signature": _signature(path, api_key, expires)}
    return f"{path}?{urlencode(query)}"


def signing_key(path: str, query: tp.Mapping[str, str], keys: tp.Sequence[str],
                now: tp.Optional[float] = None) -> str:
    """The API key whose signature `query` carries for `path`, one of `keys`, or
    `SignatureError` saying why not."""
    try:
        expires = int(query["expires"])
        signature, wanted = query["signature"], query["key"]
    except (KeyError, ValueError):
        raise SignatureError("a signed URL carries expires, key and signature") from None
    if expires < (time.time() if now is None else now):
        raise SignatureError("this signed URL has expired: ask for the job's stems again "
                             "for a new one")
    for api_key in keys:
        if hmac.compare_digest(key_id(api_key), wanted) and hmac.compare_digest(
                _signature(path, api_key, expires), signature):
            return api_key
    raise SignatureError("this signed URL is not valid: altered, of another file, or its key "
                         "was revoked")


def _signature(path: str, api_key: str, expires: int) -> str:
    secret = hmac.new(api_key.encode(), CONTEXT, hashlib.sha256).digest()
    return hmac.new(secret, f"GET {path} {expires}".encode(), hashlib.sha256).hexdigest()
