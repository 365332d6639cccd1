"""Standard Webhooks signatures: ``v1,<base64 HMAC-SHA256 of "{id}.{ts}.{body}">``.

Pure functions, no I/O. A secret is written ``whsec_<base64>``; the HMAC key
is the decoded bytes. A header may carry several space-separated signatures
(during a secret rotation); one match is enough.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

PREFIX = "whsec_"
TOLERANCE_SECONDS = 300


class SignatureError(ValueError):
    """The request is not signed by the configured secret (HTTP 401)."""


def secret_key(secret: str) -> bytes:
    """Decode a ``whsec_...`` secret into HMAC key bytes; ValueError if malformed."""
    if not secret.startswith(PREFIX):
        raise ValueError("a webhook secret starts with 'whsec_'")
    try:
        key = base64.b64decode(secret[len(PREFIX):], validate=True)
    except (ValueError, base64.binascii.Error) as exc:
        raise ValueError("the part after 'whsec_' is not valid base64") from exc
    if len(key) < 16:
        raise ValueError("a webhook secret needs at least 16 bytes of key")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one message."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def check_headers(msg_id: str | None, timestamp: str | None, signature: str | None, now: float,
                  tolerance: int = TOLERANCE_SECONDS) -> int:
    """What can be checked before the body is read: the three headers present,
    the timestamp within ``tolerance`` seconds of ``now``, and at least one
    signature of the ``v1,<base64 of 32 bytes>`` shape. Returns the timestamp;
    raises SignatureError."""
    if not msg_id or not timestamp or not signature:
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        ts = int(timestamp)
    except ValueError:
        raise SignatureError("webhook-timestamp is not an integer") from None
    if abs(now - ts) > tolerance:
        raise SignatureError(f"webhook-timestamp is more than {tolerance} seconds off")
    if not any(_is_v1(candidate) for candidate in signature.split()):
        raise SignatureError("webhook-signature has no v1 signature (v1,<base64 HMAC-SHA256>)")
    return ts


def _is_v1(candidate: str) -> bool:
    if not candidate.startswith("v1,"):
        return False
    try:
        return len(base64.b64decode(candidate[3:], validate=True)) == hashlib.sha256().digest_size
    except ValueError:  # binascii.Error is a ValueError
        return False


def verify(key: bytes, msg_id: str | None, timestamp: str | None, signature: str | None,
           body: bytes, now: float, tolerance: int = TOLERANCE_SECONDS) -> None:
    """Raise SignatureError unless the headers prove ``body`` was signed with ``key``
    within ``tolerance`` seconds of ``now``."""
    ts = check_headers(msg_id, timestamp, signature, now, tolerance)
    assert msg_id is not None and signature is not None
    expected = sign(key, msg_id, ts, body).encode()
    for candidate in signature.split():
        if hmac.compare_digest(candidate.encode(), expected):
            return
    raise SignatureError("webhook-signature does not match")
