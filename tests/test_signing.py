"""Standard Webhooks signatures (adapters.webhook.signing), against a vector
computed here independently with hmac, hashlib and base64."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from adapters.webhook.signing import SignatureError, secret_key, sign, verify

KEY_BYTES = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(KEY_BYTES).decode()
MSG_ID = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
TS = 1_700_000_000
BODY = b'{"specversion":"1.0","id":"ev-1","type":"civic.message.created"}'


def reference_signature(key: bytes, msg_id: str, ts: int, body: bytes) -> str:
    signed = msg_id.encode() + b"." + str(ts).encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def test_secret_decodes_to_key_bytes() -> None:
    assert secret_key(SECRET) == KEY_BYTES


def test_sign_matches_an_independent_vector() -> None:
    expected = reference_signature(KEY_BYTES, MSG_ID, TS, BODY)
    assert sign(KEY_BYTES, MSG_ID, TS, BODY) == expected
    # and the vector is really sensitive to each input
    assert sign(KEY_BYTES, MSG_ID, TS + 1, BODY) != expected
    assert sign(KEY_BYTES, MSG_ID + "x", TS, BODY) != expected


def test_sign_known_vector_literal() -> None:
    # the Standard Webhooks reference example (secret, id, timestamp and body from its docs)
    key = base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    body = b'{"test": 2432232314}'
    assert sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_verify_accepts_a_good_signature() -> None:
    sig = reference_signature(KEY_BYTES, MSG_ID, TS, BODY)
    verify(KEY_BYTES, MSG_ID, str(TS), sig, BODY, now=TS + 10)


def test_verify_accepts_when_one_of_several_signatures_matches() -> None:
    old = reference_signature(b"k" * 32, MSG_ID, TS, BODY)
    good = reference_signature(KEY_BYTES, MSG_ID, TS, BODY)
    verify(KEY_BYTES, MSG_ID, str(TS), f"{old} {good}", BODY, now=TS)
    verify(KEY_BYTES, MSG_ID, str(TS), f"{good} {old}", BODY, now=TS)


def test_verify_accepts_at_the_edge_of_the_tolerance() -> None:
    sig = reference_signature(KEY_BYTES, MSG_ID, TS, BODY)
    verify(KEY_BYTES, MSG_ID, str(TS), sig, BODY, now=TS + 300)
    verify(KEY_BYTES, MSG_ID, str(TS), sig, BODY, now=TS - 300)


@pytest.mark.parametrize(("msg_id", "ts", "body", "key", "now", "words"), [
    pytest.param(MSG_ID, str(TS), BODY + b" ", KEY_BYTES, TS, "does not match", id="tampered-body"),
    pytest.param(MSG_ID, str(TS), BODY.replace(b"ev-1", b"ev-2"), KEY_BYTES, TS, "does not match", id="edited-body"),
    pytest.param("msg_other", str(TS), BODY, KEY_BYTES, TS, "does not match", id="wrong-id"),
    pytest.param(MSG_ID, str(TS), BODY, bytes(reversed(KEY_BYTES)), TS, "does not match", id="wrong-key"),
    pytest.param(MSG_ID, str(TS), BODY, KEY_BYTES, TS + 301, "seconds off", id="301s-late"),
    pytest.param(MSG_ID, str(TS), BODY, KEY_BYTES, TS - 301, "seconds off", id="301s-early"),
])
def test_verify_refuses(msg_id: str, ts: str, body: bytes, key: bytes, now: int, words: str) -> None:
    sig = reference_signature(KEY_BYTES, MSG_ID, TS, BODY)
    with pytest.raises(SignatureError, match=words):
        verify(key, msg_id, ts, sig, body, now=now)


def test_verify_refuses_a_timestamp_changed_after_signing() -> None:
    sig = reference_signature(KEY_BYTES, MSG_ID, TS, BODY)
    with pytest.raises(SignatureError, match="does not match"):
        verify(KEY_BYTES, MSG_ID, str(TS + 1), sig, BODY, now=TS)


@pytest.mark.parametrize("missing", ["id", "timestamp", "signature"])
@pytest.mark.parametrize("empty", [None, ""])
def test_verify_refuses_missing_headers(missing: str, empty: str | None) -> None:
    args = {"id": MSG_ID, "timestamp": str(TS), "signature": reference_signature(KEY_BYTES, MSG_ID, TS, BODY)}
    args[missing] = empty  # type: ignore[assignment]
    with pytest.raises(SignatureError, match="missing"):
        verify(KEY_BYTES, args["id"], args["timestamp"], args["signature"], BODY, now=TS)


@pytest.mark.parametrize("ts", ["1700000000.5", "soon", "1e9", "0x6553f100"])
def test_verify_refuses_a_non_integer_timestamp(ts: str) -> None:
    sig = reference_signature(KEY_BYTES, MSG_ID, TS, BODY)
    with pytest.raises(SignatureError, match="not an integer"):
        verify(KEY_BYTES, MSG_ID, ts, sig, BODY, now=TS)


def test_signature_error_is_a_value_error() -> None:
    # sites and the webhook server catch ValueError
    assert issubclass(SignatureError, ValueError)


@pytest.mark.parametrize(("secret", "words"), [
    ("QUJDREVGR0hJSktMTU5PUFFSU1RVVldY", "whsec_"),
    ("whsec_***", "base64"),
    ("whsec_QUJD", "16 bytes"),
])
def test_malformed_secrets_are_refused(secret: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        secret_key(secret)
