"""HTTP signatures for ActivityPub: draft-cavage-12 and RFC 9421, plus body digests.

Pure functions: no I/O, no network, no clock of their own (``now`` is passed in as
Unix seconds). Every failure of an incoming request is a :class:`SignatureError`
whose ``reason`` is a short code; the inbox answers 401 with it. Malformed input of
any kind raises ``SignatureError("malformed", ...)``, never another exception type.

* draft-cavage-http-signatures-12 (what Mastodon and most of the fediverse send):
  ``Signature: keyId="…",algorithm="rsa-sha256",headers="(request-target) host date
  digest",signature="…"`` with ``Digest: SHA-256=<base64>`` (RFC 3230).
  :func:`sign_cavage`, :func:`parse_cavage`, :func:`verify_cavage`.
* RFC 9421 HTTP Message Signatures (Mastodon ≥ 4.4, Fedify's first "knock"):
  ``Signature-Input`` / ``Signature`` structured-field dictionaries (RFC 8941) and
  ``Content-Digest: sha-256=:<base64>:`` (RFC 9530).
  :func:`sign_rfc9421`, :func:`parse_rfc9421`, :func:`verify_rfc9421`.
* :func:`key_id_of` tells the inbox which key to fetch before verifying.
* Keys: RSA (PKCS#1 v1.5 with SHA-256) and Ed25519, from PEM or Multikey
  ``publicKeyMultibase``.

What is required of a signature (beyond it being valid):

* cavage: ``(request-target)``, ``host``, ``date`` or ``(created)`` covered, and
  ``digest`` when there is a body; ``Date``/``created`` within ``max_skew`` of ``now``
  both ways; ``expires`` (if given) not passed; the ``Digest`` matches the body.
* RFC 9421: ``@method``, ``@target-uri`` (or ``@authority`` and ``@path``) covered,
  and ``content-digest`` when there is a body; ``created`` present and within
  ``max_skew``; ``expires`` (if given) not passed; the ``Content-Digest`` matches.

A request "has a body" when ``body`` is non-empty, or is given (even empty) for a
method other than GET/HEAD.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.utils
import functools
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, Union
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

__all__ = [
    "CavageSignature",
    "PrivateKey",
    "PublicKey",
    "Rfc9421Signature",
    "SignatureError",
    "cached_public_key",
    "cavage_signing_string",
    "check_digest",
    "content_digest",
    "digest_header",
    "generate_ed25519_key",
    "generate_rsa_key",
    "key_id_of",
    "load_private_key",
    "load_public_key",
    "parse_cavage",
    "parse_rfc9421",
    "private_key_pem",
    "public_key_from_multibase",
    "public_key_pem",
    "public_key_to_multibase",
    "rfc9421_signature_base",
    "sign_cavage",
    "sign_rfc9421",
    "verify_cavage",
    "verify_raw",
    "verify_rfc9421",
]

PublicKey = Union[rsa.RSAPublicKey, ed25519.Ed25519PublicKey]
PrivateKey = Union[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]

DEFAULT_MAX_SKEW = 3600.0
MAX_HEADER_CHARS = 16_384  # a Signature / Signature-Input / digest header longer than this is refused
MIN_RSA_BITS = 1024
MAX_RSA_BITS = 8192  # bigger keys (or exponents) only make verification slow

REASONS = frozenset({
    "missing",               # no signature, or a signed header / required parameter is absent
    "malformed",             # unparseable header, key or parameter
    "bad_digest",            # Digest / Content-Digest absent for a body, unknown-only, or mismatched
    "expired",               # Date / created outside the window, or expires passed
    "bad_signature",         # the cryptographic check failed
    "unsupported_algorithm", # algorithm (or key type) we do not accept
    "unsupported_component", # an RFC 9421 component we cannot reproduce
    "headers_not_covered",   # a required header / component is not signed
})

_BODYLESS_METHODS = frozenset({"GET", "HEAD"})


class SignatureError(Exception):
    """A request's signature is absent or not acceptable (the inbox answers 401).

    ``reason`` is one of :data:`REASONS`; ``str(err)`` is a sentence for logs."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        self.reason = reason
        self.message = message or reason.replace("_", " ")
        super().__init__(f"{reason}: {self.message}")


_F = TypeVar("_F", bound=Callable[..., Any])


def _defensive(fn: _F) -> _F:
    """Turn any stray exception from untrusted input into SignatureError("malformed")."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SignatureError:
            raise
        except Exception as exc:  # noqa: BLE001 - the whole point: one exception type out
            raise SignatureError("malformed", f"{type(exc).__name__}: {exc}") from exc

    return wrapper  # type: ignore[return-value]


# ---------------------------------------------------------------------------- headers

def _header_lists(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Lower-cased name -> values in order. Accepts dicts and multidicts (``items()``
    yields repeated names) or a list of pairs."""
    items = headers.items() if hasattr(headers, "items") else headers
    out: dict[str, list[str]] = {}
    for name, value in items:
        if not isinstance(name, str) or not isinstance(value, str):
            raise SignatureError("malformed", "header names and values must be strings")
        out.setdefault(name.lower(), []).append(value)
    return out


def _combined(hmap: dict[str, list[str]], name: str) -> str | None:
    """One header's values, each trimmed, joined by ", " (draft-cavage §2.3, RFC 9421 §2.1)."""
    values = hmap.get(name)
    if values is None:
        return None
    parts = []
    for v in values:
        if "\n" in v or "\r" in v:
            raise SignatureError("malformed", f"header {name!r} contains a line break")
        parts.append(v.strip(" \t"))
    return ", ".join(parts)


def _has_body(method: str, body: bytes | None) -> bool:
    if body is None:
        return False
    return len(body) > 0 or method.upper() not in _BODYLESS_METHODS


def _b64decode(text: str) -> bytes:
    text = text.strip()
    if not re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", text):
        raise SignatureError("malformed", "not base64")
    text = text.rstrip("=")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError("malformed", "not base64") from exc


# ---------------------------------------------------------------------------- digests

_HASHES: dict[str, Callable[[bytes], Any]] = {"sha-256": hashlib.sha256, "sha-512": hashlib.sha512}


def digest_header(body: bytes) -> str:
    """The draft-cavage ``Digest`` header value (RFC 3230): ``SHA-256=<base64>``."""
    return "SHA-256=" + base64.b64encode(hashlib.sha256(body).digest()).decode()


def content_digest(body: bytes) -> str:
    """The RFC 9530 ``Content-Digest`` header value: ``sha-256=:<base64>:``."""
    return "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"


def _check_legacy_digest(value: str, body: bytes) -> None:
    matched = 0
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        alg, sep, b64 = part.partition("=")
        if not sep:
            raise SignatureError("malformed", "Digest entry without '='")
        fn = _HASHES.get(alg.strip().lower())
        if fn is None:
            continue  # an algorithm we do not know (md5, sha, unixsum...) proves nothing
        if not hmac.compare_digest(_b64decode(b64), fn(body).digest()):
            raise SignatureError("bad_digest", f"Digest {alg.strip()} does not match the body")
        matched += 1
    if not matched:
        raise SignatureError("bad_digest", "Digest carries no supported algorithm (sha-256, sha-512)")


def _check_content_digest(value: str, body: bytes) -> None:
    matched = 0
    for alg, (item, _params) in _parse_sf_dictionary(value).items():
        fn = _HASHES.get(alg)
        if fn is None:
            continue
        if not isinstance(item, bytes):
            raise SignatureError("malformed", f"Content-Digest {alg} is not a byte sequence")
        if not hmac.compare_digest(item, fn(body).digest()):
            raise SignatureError("bad_digest", f"Content-Digest {alg} does not match the body")
        matched += 1
    if not matched:
        raise SignatureError("bad_digest", "Content-Digest carries no supported algorithm (sha-256, sha-512)")


@_defensive
def check_digest(headers: Mapping[str, str], body: bytes | None) -> tuple[str, ...]:
    """Check ``Digest`` and/or ``Content-Digest`` against the raw body.

    Every digest header present must carry at least one supported algorithm
    (sha-256, sha-512) and every supported entry must match; a non-empty body with
    neither header is refused. Returns the (lower-case) names of the headers checked."""
    hmap = _header_lists(headers)
    data = body or b""
    checked: list[str] = []
    legacy = _combined(hmap, "digest")
    if legacy is not None:
        _limit(legacy, "Digest")
        _check_legacy_digest(legacy, data)
        checked.append("digest")
    modern = _combined(hmap, "content-digest")
    if modern is not None:
        _limit(modern, "Content-Digest")
        _check_content_digest(modern, data)
        checked.append("content-digest")
    if not checked and data:
        raise SignatureError("bad_digest", "the request has a body but no Digest or Content-Digest header")
    return tuple(checked)


def _limit(value: str, what: str) -> None:
    if len(value) > MAX_HEADER_CHARS:
        raise SignatureError("malformed", f"{what} header is too long")


# ---------------------------------------------------------------------------- keys

def generate_rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    """A new RSA key (2048 bits, e=65537: what Mastodon and Fedify use for actors)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def generate_ed25519_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def private_key_pem(key: PrivateKey) -> str:
    """PKCS#8 PEM, unencrypted."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption(),
    ).decode()


def public_key_pem(key: PublicKey | PrivateKey) -> str:
    """SubjectPublicKeyInfo PEM (``-----BEGIN PUBLIC KEY-----``), as in ``publicKeyPem``."""
    if isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _accept_public(key: object) -> PublicKey:
    if isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise SignatureError("unsupported_algorithm", f"RSA key of {key.key_size} bits (accepted: "
                                 f"{MIN_RSA_BITS}-{MAX_RSA_BITS})")
        if key.public_numbers().e.bit_length() > 32:
            raise SignatureError("unsupported_algorithm", "RSA public exponent is too large")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise SignatureError("unsupported_algorithm", f"unsupported key type {type(key).__name__}")


@_defensive
def load_public_key(pem: str) -> PublicKey:
    """An RSA or Ed25519 public key from PEM (SubjectPublicKeyInfo, or PKCS#1 ``RSA PUBLIC KEY``)."""
    if not isinstance(pem, str) or "-----BEGIN" not in pem or len(pem) > MAX_HEADER_CHARS:
        raise SignatureError("malformed", "not a PEM public key")
    try:
        key = serialization.load_pem_public_key(pem.strip().encode("ascii"))
    except (ValueError, TypeError, UnicodeError) as exc:
        raise SignatureError("malformed", "not a PEM public key") from exc
    return _accept_public(key)


@functools.lru_cache(maxsize=1024)
def cached_public_key(pem: str) -> PublicKey:
    """:func:`load_public_key` with an LRU cache (parsing PEM is slow; errors are not cached)."""
    return load_public_key(pem)


@_defensive
def load_private_key(pem: str) -> PrivateKey:
    """An RSA or Ed25519 private key from unencrypted PEM (PKCS#8 or PKCS#1)."""
    try:
        key = serialization.load_pem_private_key(pem.strip().encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeError) as exc:
        raise SignatureError("malformed", "not a PEM private key") from exc
    if not isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise SignatureError("unsupported_algorithm", f"unsupported key type {type(key).__name__}")
    return key


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}
_MC_ED25519 = b"\xed\x01"  # multicodec ed25519-pub (0xed) as unsigned varint
_MC_RSA = b"\x85\x24"      # multicodec rsa-pub (0x1205): DER PKCS#1 RSAPublicKey


def _b58decode(text: str) -> bytes:
    n = 0
    for ch in text:
        idx = _B58_INDEX.get(ch)
        if idx is None:
            raise SignatureError("malformed", "not base58btc")
        n = n * 58 + idx
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\x00" * zeros + body


def _b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    zeros = len(data) - len(data.lstrip(b"\x00"))
    return "1" * zeros + "".join(reversed(out))


@_defensive
def public_key_from_multibase(value: str) -> PublicKey:
    """A key from a Multikey ``publicKeyMultibase`` (FEP-521a): ``z`` + base58btc of a
    multicodec prefix (0xed01 Ed25519, raw 32 bytes; 0x1205 RSA, DER PKCS#1) and the key."""
    if not isinstance(value, str) or not value.startswith("z") or len(value) > 4096:
        raise SignatureError("malformed", "publicKeyMultibase must be base58btc ('z' prefix)")
    raw = _b58decode(value[1:])
    if raw.startswith(_MC_ED25519):
        key_bytes = raw[len(_MC_ED25519):]
        if len(key_bytes) != 32:
            raise SignatureError("malformed", "an Ed25519 Multikey has 32 key bytes")
        return ed25519.Ed25519PublicKey.from_public_bytes(key_bytes)
    if raw.startswith(_MC_RSA):
        try:
            key = serialization.load_der_public_key(raw[len(_MC_RSA):])
        except (ValueError, TypeError) as exc:
            raise SignatureError("malformed", "bad RSA Multikey") from exc
        if not isinstance(key, rsa.RSAPublicKey):
            raise SignatureError("malformed", "bad RSA Multikey")
        return _accept_public(key)
    raise SignatureError("unsupported_algorithm", "Multikey is neither Ed25519 (0xed) nor RSA (0x1205)")


def public_key_to_multibase(key: PublicKey | PrivateKey) -> str:
    """The Multikey ``publicKeyMultibase`` of a key (inverse of :func:`public_key_from_multibase`)."""
    if isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        key = key.public_key()
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = _MC_ED25519 + key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    elif isinstance(key, rsa.RSAPublicKey):
        raw = _MC_RSA + key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    else:
        raise SignatureError("unsupported_algorithm", f"unsupported key type {type(key).__name__}")
    return "z" + _b58encode(raw)


# ---------------------------------------------------------------------------- raw crypto

def _sign_bytes(private_key: PrivateKey, data: bytes) -> bytes:
    if isinstance(private_key, rsa.RSAPrivateKey):
        return private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign(data)
    raise SignatureError("unsupported_algorithm", f"cannot sign with {type(private_key).__name__}")


def verify_raw(public_key: PublicKey, kind: str, data: bytes, signature: bytes) -> None:
    """Check ``signature`` over ``data``; ``kind`` is "rsa" (PKCS#1 v1.5, SHA-256) or
    "ed25519". Raises SignatureError("bad_signature") on failure."""
    try:
        if kind == "rsa" and isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
            return
        if kind == "ed25519" and isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
            return
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise SignatureError("bad_signature", "the signature does not verify with the key") from exc
    raise SignatureError("unsupported_algorithm", f"a {type(public_key).__name__} cannot check a {kind} signature")


def _key_kind(key: object) -> str:
    if isinstance(key, (rsa.RSAPublicKey, rsa.RSAPrivateKey)):
        return "rsa"
    if isinstance(key, (ed25519.Ed25519PublicKey, ed25519.Ed25519PrivateKey)):
        return "ed25519"
    raise SignatureError("unsupported_algorithm", f"unsupported key type {type(key).__name__}")


def _check_window(label: str, when: float, now: float, max_skew: float) -> None:
    if when > now + max_skew:
        raise SignatureError("expired", f"{label} is {when - now:.0f} s in the future (limit {max_skew:.0f} s)")
    if when < now - max_skew:
        raise SignatureError("expired", f"{label} is {now - when:.0f} s old (limit {max_skew:.0f} s)")


# ---------------------------------------------------------------------------- draft-cavage

@dataclass(frozen=True)
class CavageSignature:
    """A parsed draft-cavage ``Signature`` header."""

    key_id: str
    algorithm: str | None           # lower-cased; None if the parameter was absent
    headers: tuple[str, ...]        # lower-cased; ("(created)",) if absent (draft-12 §2.1.6)
    signature: bytes
    created: str | None = None      # as sent (the signing string uses the exact text)
    expires: str | None = None


_CAVAGE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_CAVAGE_NUMBER = re.compile(r"\d{1,15}(?:\.\d{1,9})?")


def _parse_cavage_params(value: str) -> dict[str, str]:
    params: dict[str, str] = {}
    i, n = 0, len(value)
    while True:
        while i < n and value[i] in " \t,":
            i += 1
        if i >= n:
            return params
        m = _CAVAGE_NAME.match(value, i)
        if not m:
            raise SignatureError("malformed", f"bad parameter name at offset {i}")
        name = m.group().lower()
        i = m.end()
        while i < n and value[i] in " \t":
            i += 1
        if i >= n or value[i] != "=":
            raise SignatureError("malformed", f"parameter {name!r} has no value")
        i += 1
        while i < n and value[i] in " \t":
            i += 1
        if i < n and value[i] == '"':
            i += 1
            out = []
            while True:
                if i >= n:
                    raise SignatureError("malformed", f"unterminated quoted value of {name!r}")
                ch = value[i]
                if ch == "\\" and i + 1 < n:
                    out.append(value[i + 1])
                    i += 2
                    continue
                if ch == '"':
                    i += 1
                    break
                out.append(ch)
                i += 1
            text = "".join(out)
        else:
            j = i
            while j < n and value[j] not in ", \t":
                j += 1
            text = value[i:j]
            i = j
            if not text:
                raise SignatureError("malformed", f"parameter {name!r} has an empty value")
        if name in params:
            raise SignatureError("malformed", f"parameter {name!r} appears twice")
        params[name] = text
        while i < n and value[i] in " \t":
            i += 1
        if i < n and value[i] != ",":
            raise SignatureError("malformed", f"expected ',' after parameter {name!r}")


@_defensive
def parse_cavage(value: str) -> CavageSignature:
    """Parse a draft-cavage ``Signature`` header value (or the part of an
    ``Authorization: Signature …`` header after the scheme)."""
    if not isinstance(value, str):
        raise SignatureError("malformed", "Signature header must be a string")
    _limit(value, "Signature")
    params = _parse_cavage_params(value)
    key_id = params.get("keyid")
    sig_b64 = params.get("signature")
    if not key_id:
        raise SignatureError("missing", "Signature has no keyId")
    if sig_b64 is None:
        raise SignatureError("missing", "Signature has no signature parameter")
    signature = _b64decode(sig_b64)
    if not signature:
        raise SignatureError("malformed", "empty signature")
    headers_param = params.get("headers")
    if headers_param is None:
        headers: tuple[str, ...] = ("(created)",)
    else:
        headers = tuple(h.lower() for h in headers_param.split())
        if not headers:
            raise SignatureError("malformed", "empty headers parameter")
    for what in ("created", "expires"):
        if what in params and not _CAVAGE_NUMBER.fullmatch(params[what]):
            raise SignatureError("malformed", f"{what} is not a Unix timestamp")
    alg = params.get("algorithm")
    return CavageSignature(
        key_id=key_id,
        algorithm=alg.lower() if alg is not None else None,
        headers=headers,
        signature=signature,
        created=params.get("created"),
        expires=params.get("expires"),
    )


@_defensive
def cavage_signing_string(
    method: str, path_and_query: str, headers: Mapping[str, str], covered: Iterable[str],
    created: str | None = None, expires: str | None = None,
) -> str:
    """The draft-cavage signing string (§2.3): one ``name: value`` line per covered
    header, lower-case names, ``(request-target)`` = ``<method lower> <path?query>``."""
    hmap = _header_lists(headers)
    lines = []
    for name in covered:
        if name == "(request-target)":
            value = f"{method.lower()} {path_and_query}"
        elif name == "(created)":
            if created is None:
                raise SignatureError("missing", "(created) is signed but there is no created parameter")
            value = created
        elif name == "(expires)":
            if expires is None:
                raise SignatureError("missing", "(expires) is signed but there is no expires parameter")
            value = expires
        else:
            combined = _combined(hmap, name)
            if combined is None:
                raise SignatureError("missing", f"signed header {name!r} is not in the request")
            value = combined
        lines.append(f"{name}: {value}")
    return "\n".join(lines)


def _cavage_kind(algorithm: str | None, public_key: PublicKey) -> str:
    kind = _key_kind(public_key)
    if algorithm in (None, "hs2019"):
        return kind  # hs2019: "derive the algorithm from the key" (in practice rsa-sha256 or ed25519)
    if algorithm == "rsa-sha256":
        if kind != "rsa":
            raise SignatureError("unsupported_algorithm", "algorithm rsa-sha256 with a non-RSA key")
        return "rsa"
    raise SignatureError("unsupported_algorithm", f"algorithm {algorithm!r} is not accepted (rsa-sha256, hs2019)")


def _request_target(url: str) -> tuple[str, str]:
    """(host[:port], path?query) of an absolute URL."""
    parts = urlsplit(url)
    if not parts.netloc:
        raise SignatureError("malformed", f"not an absolute URL: {url!r}")
    host = parts.netloc.rpartition("@")[2]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host, target


def sign_cavage(
    method: str, url: str, headers: Mapping[str, str], body: bytes | None,
    key_id: str, private_key: PrivateKey, now: float,
) -> dict[str, str]:
    """Sign a request draft-cavage style, as Mastodon does. Returns the headers to add:
    ``Date`` (IMF-fixdate, unless ``headers`` has one), ``Host`` (from the URL unless
    given), ``Digest`` (when ``body`` is not None) and ``Signature`` covering
    ``(request-target) host date [digest]``. RSA keys sign ``rsa-sha256``; Ed25519
    keys sign as ``hs2019``."""
    hmap = _header_lists(headers)
    host, target = _request_target(url)
    out: dict[str, str] = {
        "Date": _combined(hmap, "date") or email.utils.formatdate(now, usegmt=True),
        "Host": _combined(hmap, "host") or host,
    }
    covered = ["(request-target)", "host", "date"]
    if body is not None:
        out["Digest"] = digest_header(body)
        covered.append("digest")
    kind = _key_kind(private_key)
    signing = cavage_signing_string(method, target, {k.lower(): v for k, v in out.items()}, covered)
    signature = base64.b64encode(_sign_bytes(private_key, signing.encode())).decode()
    algorithm = "rsa-sha256" if kind == "rsa" else "hs2019"
    out["Signature"] = (
        f'keyId="{key_id}",algorithm="{algorithm}",headers="{" ".join(covered)}",signature="{signature}"'
    )
    return out


def _cavage_header(hmap: dict[str, list[str]]) -> str | None:
    sig = _combined(hmap, "signature")
    if sig is not None:
        return sig
    auth = _combined(hmap, "authorization")
    if auth is not None and auth[:10].lower() == "signature ":
        return auth[10:]
    return None


@_defensive
def verify_cavage(
    method: str, path_and_query: str, headers: Mapping[str, str], body: bytes | None,
    public_key: PublicKey, now: float, max_skew: float = DEFAULT_MAX_SKEW,
) -> CavageSignature:
    """Verify a draft-cavage signed request (``Signature`` header, or
    ``Authorization: Signature …``). Returns the parsed signature; raises SignatureError.

    ``path_and_query`` is the request target as received (``/inbox`` or
    ``/users/a/outbox?page=2``). If it has a query and the signature fails, the path
    alone is tried too: Fedify signs ``(request-target)`` without the query."""
    hmap = _header_lists(headers)
    value = _cavage_header(hmap)
    if value is None:
        raise SignatureError("missing", "the request has no Signature header")
    sig = parse_cavage(value)
    kind = _cavage_kind(sig.algorithm, _accept_public(public_key))
    if sig.algorithm == "rsa-sha256" and {"(created)", "(expires)"} & set(sig.headers):
        # draft-cavage-12 §2.3: (created)/(expires) with an rsa-* algorithm is an error (Mastodon agrees)
        raise SignatureError("malformed", "(created)/(expires) cannot be signed with algorithm rsa-sha256")

    covered = set(sig.headers)
    missing = [h for h in ("(request-target)", "host") if h not in covered]
    if "date" not in covered and "(created)" not in covered:
        missing.append("date")
    body_present = _has_body(method, body)
    if body_present and "digest" not in covered:
        missing.append("digest")
    if missing:
        raise SignatureError("headers_not_covered", f"the signature does not cover {', '.join(missing)}")

    if "date" in covered:
        date_value = _combined(hmap, "date")
        if date_value is None:
            raise SignatureError("missing", "signed header 'date' is not in the request")
        _check_window("Date", _parse_http_date(date_value), now, max_skew)
    if "(created)" in covered:
        if sig.created is None:
            raise SignatureError("missing", "(created) is signed but there is no created parameter")
        _check_window("created", float(sig.created), now, max_skew)
    if sig.expires is not None and float(sig.expires) < now:
        raise SignatureError("expired", "the signature's expires time has passed")

    if "digest" in covered or body_present:
        if _combined(hmap, "digest") is None and "digest" in covered:
            raise SignatureError("missing", "signed header 'digest' is not in the request")
        check_digest(headers, body)

    targets = [path_and_query]
    if "?" in path_and_query:
        targets.append(path_and_query.partition("?")[0])
    error: SignatureError | None = None
    for target in targets:
        signing = cavage_signing_string(method, target, headers, sig.headers, sig.created, sig.expires)
        try:
            verify_raw(public_key, kind, signing.encode(), sig.signature)
            return sig
        except SignatureError as exc:
            error = error or exc
    assert error is not None
    raise error


def _parse_http_date(value: str) -> float:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError) as exc:
        raise SignatureError("malformed", f"Date {value!r} is not an HTTP date") from exc
    if parsed is None:
        raise SignatureError("malformed", f"Date {value!r} is not an HTTP date")
    if parsed.tzinfo is None:  # "-0000": UTC by convention
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return parsed.timestamp()


# ---------------------------------------------------------------------------- RFC 8941 structured fields (subset)

class _Token(str):
    """An sf-token (serialized bare, unlike an sf-string)."""


_SF_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_SF_TOKEN = re.compile(r"[A-Za-z*][A-Za-z0-9!#$%&'*+\-.^_`|~:/]*")
_SF_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_SF_BYTES = re.compile(r":([A-Za-z0-9+/=]*):")

Params = tuple[tuple[str, Any], ...]


class _SfParser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def fail(self, what: str) -> SignatureError:
        return SignatureError("malformed", f"structured field: {what} at offset {self.i}")

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def skip_sp(self) -> None:
        while self.peek() == " ":
            self.i += 1

    def skip_ows(self) -> None:
        while self.peek() in (" ", "\t") and self.peek():
            self.i += 1

    def key(self) -> str:
        m = _SF_KEY.match(self.s, self.i)
        if not m:
            raise self.fail("expected a key")
        self.i = m.end()
        return m.group()

    def bare_item(self) -> Any:
        ch = self.peek()
        if ch == '"':
            return self.string()
        if ch == ":":
            m = _SF_BYTES.match(self.s, self.i)
            if not m:
                raise self.fail("bad byte sequence")
            self.i = m.end()
            return _b64decode(m.group(1))
        if ch == "?":
            if self.s[self.i:self.i + 2] in ("?0", "?1"):
                self.i += 2
                return self.s[self.i - 1] == "1"
            raise self.fail("bad boolean")
        if ch == "-" or ch.isdigit():
            m = _SF_NUMBER.match(self.s, self.i)
            if not m:
                raise self.fail("bad number")
            text = m.group()
            self.i = m.end()
            if "." in text:
                ip, fp = text.lstrip("-").split(".")
                if len(ip) > 12 or len(fp) > 3:
                    raise self.fail("decimal out of range")
                return float(text)
            if len(text.lstrip("-")) > 15:
                raise self.fail("integer out of range")
            return int(text)
        m = _SF_TOKEN.match(self.s, self.i)
        if m:
            self.i = m.end()
            return _Token(m.group())
        raise self.fail("expected an item")

    def string(self) -> str:
        self.i += 1
        out = []
        while True:
            ch = self.peek()
            if not ch:
                raise self.fail("unterminated string")
            self.i += 1
            if ch == "\\":
                nxt = self.peek()
                if nxt not in ('"', "\\") or not nxt:
                    raise self.fail("bad escape")
                out.append(nxt)
                self.i += 1
            elif ch == '"':
                return "".join(out)
            elif not (" " <= ch <= "~"):
                raise self.fail("non-printable character in string")
            else:
                out.append(ch)

    def params(self) -> Params:
        out: dict[str, Any] = {}
        while self.peek() == ";":
            self.i += 1
            self.skip_sp()
            k = self.key()
            if self.peek() == "=":
                self.i += 1
                out[k] = self.bare_item()
            else:
                out[k] = True
        return tuple(out.items())

    def item_or_inner_list(self) -> tuple[Any, Params]:
        if self.peek() == "(":
            self.i += 1
            items: list[tuple[Any, Params]] = []
            while True:
                self.skip_sp()
                if self.peek() == ")":
                    self.i += 1
                    return items, self.params()
                value = self.bare_item()
                items.append((value, self.params()))
                if self.peek() not in (" ", ")"):
                    raise self.fail("expected ' ' or ')' in inner list")
        value = self.bare_item()
        return value, self.params()

    def dictionary(self) -> dict[str, tuple[Any, Params]]:
        out: dict[str, tuple[Any, Params]] = {}
        self.skip_sp()
        if not self.peek():
            return out
        while True:
            k = self.key()
            if self.peek() == "=":
                self.i += 1
                out[k] = self.item_or_inner_list()
            else:
                out[k] = (True, self.params())
            self.skip_ows()
            if not self.peek():
                return out
            if self.peek() != ",":
                raise self.fail("expected ','")
            self.i += 1
            self.skip_ows()
            if not self.peek():
                raise self.fail("trailing ','")


def _parse_sf_dictionary(text: str) -> dict[str, tuple[Any, Params]]:
    _limit(text, "structured")
    return _SfParser(text).dictionary()


def _ser_bare(value: Any) -> str:
    if isinstance(value, bool):
        return "?1" if value else "?0"
    if isinstance(value, _Token):
        return str(value)
    if isinstance(value, str):
        if any(not (" " <= c <= "~") for c in value):
            raise SignatureError("malformed", "string with a non-printable character")
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = f"{round(value, 3):.3f}".rstrip("0")
        return text + "0" if text.endswith(".") else text
    if isinstance(value, bytes):
        return ":" + base64.b64encode(value).decode() + ":"
    raise SignatureError("malformed", f"cannot serialize {type(value).__name__}")


def _ser_params(params: Params) -> str:
    out = []
    for k, v in params:
        out.append(f";{k}" if v is True else f";{k}={_ser_bare(v)}")
    return "".join(out)


# ---------------------------------------------------------------------------- RFC 9421

@dataclass(frozen=True)
class Rfc9421Signature:
    """One signature of an RFC 9421 request (a ``Signature-Input`` member and its
    ``Signature`` bytes)."""

    label: str
    components: tuple[str, ...]                 # component names as sent ("@method", "content-digest")
    signature: bytes
    created: int | None = None
    expires: int | None = None
    keyid: str | None = None
    alg: str | None = None
    nonce: str | None = None
    tag: str | None = None
    params: Params = ()                         # all signature parameters, in order (for @signature-params)
    component_params: tuple[Params, ...] = ()   # parameters of each component identifier

    def signature_params(self) -> str:
        """The ``@signature-params`` value: the serialized inner list with its parameters."""
        items = " ".join(
            _ser_bare(name) + _ser_params(cp)
            for name, cp in zip(self.components, self.component_params or ((),) * len(self.components))
        )
        return f"({items}){_ser_params(self.params)}"


_PARAM_TYPES: dict[str, type] = {"created": int, "expires": int, "keyid": str, "alg": str, "nonce": str, "tag": str}


@_defensive
def parse_rfc9421(signature_input: str, signature: str) -> list[Rfc9421Signature]:
    """The signatures of a request, in ``Signature-Input`` order, for each label that
    both headers carry. Raises SignatureError("malformed") on bad syntax or when no
    label is usable."""
    if not isinstance(signature_input, str) or not isinstance(signature, str):
        raise SignatureError("malformed", "Signature-Input and Signature must be strings")
    inputs = _parse_sf_dictionary(signature_input)
    sigs = _parse_sf_dictionary(signature)
    out: list[Rfc9421Signature] = []
    for label, (value, params) in inputs.items():
        if not isinstance(value, list):
            raise SignatureError("malformed", f"Signature-Input {label!r} is not an inner list")
        sig_entry = sigs.get(label)
        if sig_entry is None:
            continue
        sig_bytes = sig_entry[0]
        if not isinstance(sig_bytes, bytes) or not sig_bytes:
            raise SignatureError("malformed", f"Signature {label!r} is not a byte sequence")
        names: list[str] = []
        cparams: list[Params] = []
        for item, item_params in value:
            if not isinstance(item, str) or isinstance(item, _Token):
                raise SignatureError("malformed", f"component identifiers of {label!r} must be strings")
            names.append(item)
            cparams.append(item_params)
        fields: dict[str, Any] = {}
        for k, v in params:
            want = _PARAM_TYPES.get(k)
            if want is None:
                continue
            if want is str and (not isinstance(v, str) or isinstance(v, _Token)):
                raise SignatureError("malformed", f"parameter {k} of {label!r} must be a string")
            if want is int and (not isinstance(v, int) or isinstance(v, bool)):
                raise SignatureError("malformed", f"parameter {k} of {label!r} must be an integer")
            fields[k] = v
        out.append(Rfc9421Signature(
            label=label, components=tuple(names), signature=sig_bytes, params=params,
            component_params=tuple(cparams), **fields,
        ))
    if not out:
        raise SignatureError("malformed", "no label appears in both Signature-Input and Signature")
    return out


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _derived(name: str, method: str, url: str) -> str:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if not scheme or not parts.netloc:
        raise SignatureError("malformed", f"the target URI must be absolute: {url!r}")
    path = parts.path or "/"
    if name == "@method":
        return method
    if name == "@target-uri":
        return url
    if name == "@authority":
        host = (parts.hostname or "").lower()
        if ":" in host:
            host = f"[{host}]"
        port = parts.port
        return host if port is None or port == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    if name == "@scheme":
        return scheme
    if name == "@path":
        return path
    if name == "@query":
        return "?" + parts.query
    if name == "@request-target":
        return path + (f"?{parts.query}" if parts.query else "")
    raise SignatureError("unsupported_component", f"derived component {name!r} is not supported")


@_defensive
def rfc9421_signature_base(
    method: str, url: str, headers: Mapping[str, str], sig: Rfc9421Signature,
) -> str:
    """The signature base of RFC 9421 §2.5 for a request (``url`` = full target URI)."""
    hmap = _header_lists(headers)
    lines = []
    seen = set()
    cparams = sig.component_params or ((),) * len(sig.components)
    for name, params in zip(sig.components, cparams):
        if params:
            raise SignatureError("unsupported_component", f"component parameters on {name!r} are not supported")
        if name in seen:
            raise SignatureError("malformed", f"component {name!r} is listed twice")
        seen.add(name)
        if name == "@signature-params":
            raise SignatureError("malformed", "@signature-params cannot be a covered component")
        if name.startswith("@"):
            value = _derived(name, method, url)
        else:
            if name != name.lower():
                raise SignatureError("malformed", f"field name {name!r} must be lower-case")
            combined = _combined(hmap, name)
            if combined is None:
                raise SignatureError("missing", f"signed field {name!r} is not in the request")
            value = combined
        if "\n" in value or "\r" in value:
            raise SignatureError("malformed", f"component {name!r} contains a line break")
        lines.append(f"{_ser_bare(name)}: {value}")
    lines.append(f'"@signature-params": {sig.signature_params()}')
    return "\n".join(lines)


_RFC9421_ALGS = {"rsa-v1_5-sha256": "rsa", "ed25519": "ed25519"}


def _rfc9421_kind(alg: str | None, public_key: PublicKey) -> str:
    kind = _key_kind(public_key)
    if alg is None:
        return kind
    want = _RFC9421_ALGS.get(alg)
    if want is None:
        raise SignatureError("unsupported_algorithm", f"alg {alg!r} is not accepted (rsa-v1_5-sha256, ed25519)")
    if want != kind:
        raise SignatureError("unsupported_algorithm", f"alg {alg!r} does not match the key type")
    return kind


def _verify_one(
    method: str, url: str, headers: Mapping[str, str], body: bytes | None, sig: Rfc9421Signature,
    public_key: PublicKey, now: float, max_skew: float,
) -> None:
    covered = set(sig.components)
    missing = [] if "@method" in covered else ["@method"]
    if "@target-uri" not in covered and not {"@authority", "@path"} <= covered:
        missing.append("@target-uri")
    body_present = _has_body(method, body)
    if body_present and "content-digest" not in covered:
        missing.append("content-digest")
    if missing:
        raise SignatureError("headers_not_covered", f"signature {sig.label!r} does not cover {', '.join(missing)}")
    if sig.created is None:
        raise SignatureError("missing", f"signature {sig.label!r} has no created parameter")
    _check_window("created", float(sig.created), now, max_skew)
    if sig.expires is not None and sig.expires < now:
        raise SignatureError("expired", f"signature {sig.label!r} expired")
    kind = _rfc9421_kind(sig.alg, public_key)
    if "content-digest" in covered or body_present:
        if "content-digest" in covered and _combined(_header_lists(headers), "content-digest") is None:
            raise SignatureError("missing", "signed field 'content-digest' is not in the request")
        check_digest(headers, body)
    base = rfc9421_signature_base(method, url, headers, sig)
    verify_raw(public_key, kind, base.encode(), sig.signature)


@_defensive
def verify_rfc9421(
    method: str, url: str, headers: Mapping[str, str], body: bytes | None,
    public_key: PublicKey, now: float, max_skew: float = DEFAULT_MAX_SKEW,
) -> Rfc9421Signature:
    """Verify an RFC 9421 signed request; ``url`` is the full target URI as the
    signer saw it (scheme, host, path, query). Returns the first signature (in
    ``Signature-Input`` order) that passes; otherwise raises the first failure."""
    hmap = _header_lists(headers)
    sig_input = _combined(hmap, "signature-input")
    sig_value = _combined(hmap, "signature")
    if sig_input is None or sig_value is None:
        raise SignatureError("missing", "the request has no Signature-Input and Signature headers")
    public_key = _accept_public(public_key)
    first: SignatureError | None = None
    for sig in parse_rfc9421(sig_input, sig_value):
        try:
            _verify_one(method, url, headers, body, sig, public_key, now, max_skew)
            return sig
        except SignatureError as exc:
            first = first or exc
    assert first is not None
    raise first


def sign_rfc9421(
    method: str, url: str, headers: Mapping[str, str], body: bytes | None,
    key_id: str, private_key: PrivateKey, now: float, *,
    label: str = "sig1", components: Iterable[str] | None = None,
    nonce: str | None = None, tag: str | None = None,
) -> dict[str, str]:
    """Sign a request per RFC 9421. Returns the headers to add: ``Content-Digest``
    (when ``body`` is not None), ``Signature-Input`` and ``Signature``. Default
    components: ``@method @target-uri`` and ``content-digest`` for a body;
    parameters ``created``, ``keyid``, ``alg`` (rsa-v1_5-sha256 or ed25519)."""
    if not _SF_KEY.fullmatch(label):
        raise SignatureError("malformed", f"label {label!r} is not an sf-key")
    kind = _key_kind(private_key)
    alg = "rsa-v1_5-sha256" if kind == "rsa" else "ed25519"
    out: dict[str, str] = {}
    if body is not None:
        out["Content-Digest"] = content_digest(body)
    comps = list(components) if components is not None else ["@method", "@target-uri"]
    if body is not None and "content-digest" not in comps:
        comps.append("content-digest")
    params: list[tuple[str, Any]] = [("created", int(now)), ("keyid", key_id), ("alg", alg)]
    if nonce is not None:
        params.append(("nonce", nonce))
    if tag is not None:
        params.append(("tag", tag))
    sig = Rfc9421Signature(
        label=label, components=tuple(comps), signature=b"", created=int(now), keyid=key_id, alg=alg,
        params=tuple(params), component_params=((),) * len(comps),
    )
    merged: dict[str, str] = {k.lower(): v for k, v in headers.items()}
    merged.update({k.lower(): v for k, v in out.items()})
    base = rfc9421_signature_base(method, url, merged, sig)
    raw = _sign_bytes(private_key, base.encode())
    out["Signature-Input"] = f"{label}={sig.signature_params()}"
    out["Signature"] = f"{label}=:{base64.b64encode(raw).decode()}:"
    return out


# ---------------------------------------------------------------------------- which key?

@_defensive
def key_id_of(headers: Mapping[str, str]) -> str | None:
    """The keyId of the request's signature, so the inbox can fetch the key first:
    the first RFC 9421 signature's ``keyid`` if ``Signature-Input`` is present, else
    the draft-cavage ``keyId``. None if the request carries no signature; raises
    SignatureError if the header is malformed."""
    hmap = _header_lists(headers)
    sig_input = _combined(hmap, "signature-input")
    sig_value = _combined(hmap, "signature")
    if sig_input is not None:
        if sig_value is None:
            raise SignatureError("missing", "Signature-Input without Signature")
        for sig in parse_rfc9421(sig_input, sig_value):
            if sig.keyid:
                return sig.keyid
        raise SignatureError("missing", "no RFC 9421 signature has a keyid")
    value = _cavage_header(hmap)
    if value is None:
        return None
    return parse_cavage(value).key_id


@_defensive
def check_fresh(headers: Mapping[str, str], now: float, max_skew: float = DEFAULT_MAX_SKEW) -> None:
    """What can be checked of a signature before the body is read: its time.
    Raises SignatureError("expired") unless the signature the verifier would
    use could be in its window: for RFC 9421 one signature's ``created``; for
    draft-cavage the ``Date`` header (when signed) and the ``created``
    parameter (when present), and no ``expires`` passed. Does nothing for an
    unsigned request (``key_id_of`` says so)."""
    hmap = _header_lists(headers)
    sig_input = _combined(hmap, "signature-input")
    sig_value = _combined(hmap, "signature")
    if sig_input is not None and sig_value is not None:
        first: SignatureError | None = None
        for sig in parse_rfc9421(sig_input, sig_value):
            try:
                if sig.created is None:
                    raise SignatureError("missing", f"signature {sig.label!r} has no created parameter")
                _check_window("created", float(sig.created), now, max_skew)
                if sig.expires is not None and sig.expires < now:
                    raise SignatureError("expired", f"signature {sig.label!r} expired")
                return
            except SignatureError as exc:
                first = first or exc
        if first is not None:
            raise first
        return
    value = _cavage_header(hmap)
    if value is None:
        return
    sig = parse_cavage(value)
    if "date" in sig.headers:
        date_value = _combined(hmap, "date")
        if date_value is None:
            raise SignatureError("missing", "signed header 'date' is not in the request")
        _check_window("Date", _parse_http_date(date_value), now, max_skew)
    if "(created)" in sig.headers and sig.created is not None:
        _check_window("created", float(sig.created), now, max_skew)
    if sig.expires is not None and float(sig.expires) < now:
        raise SignatureError("expired", "the signature's expires time has passed")
