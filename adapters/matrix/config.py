"""Settings of one Matrix homeserver (``[platforms.NAME]`` with ``kind = "matrix"``).

The gateway is a Matrix Application Service on that homeserver: the tokens
and names here are also what ``civic-gateway matrix registration`` writes into
the registration file the homeserver loads (docs/matrix.md)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

from gateway.kit import check_url

# Matrix grammar (spec, Appendices: identifier grammar): a user localpart is
# made of a-z 0-9 . _ = - / + ; a server name is a host name, an IPv4 address
# or a bracketed IPv6 address, with an optional port.
Localpart = Annotated[str, Meta(pattern=r"^[a-z0-9._=/+-]+$", min_length=1, max_length=64)]
ServerName = Annotated[str, Meta(pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,255})(:[0-9]{1,5})?$")]
# Tokens travel as ``Authorization: Bearer``: token68 characters only.
Token = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._~+/=-]+$", min_length=32, max_length=512)]
HttpUrl = Annotated[str, Meta(max_length=2048)]
"""An http(s) URL, checked by ``gateway.config.check_url`` in ``__post_init__``."""


class MatrixConfig(Struct, forbid_unknown_fields=True, kw_only=True, dict=True):
    homeserver: HttpUrl
    """The homeserver's client-server API base, e.g. ``https://matrix.example.org``."""
    server_name: ServerName
    """The homeserver's server name, the part after ``:`` in its user ids
    (``example.org`` for ``@alice:example.org``); it may differ from the host
    in ``homeserver``."""
    as_token: Token
    """The appservice's token towards the homeserver (at least 32 characters:
    ``python3 -c 'import secrets; print(secrets.token_urlsafe(32))'``)."""
    hs_token: Token
    """The homeserver's token towards the gateway; must differ from ``as_token``."""
    appservice_url: HttpUrl
    """Where the homeserver reaches this platform's appservice endpoint on the
    gateway; the homeserver appends ``/_matrix/app/v1/...`` to it."""
    id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._~-]+$", min_length=1, max_length=64)] = "civic-gateway"
    """The registration's id: unique among the homeserver's appservices, never changed."""
    bot_localpart: Localpart = "civic"
    """The appservice's own user (``sender_localpart``): ``@civic:<server_name>``."""
    ghost_prefix: Annotated[str, Meta(pattern=r"^[a-z0-9._=/+-]+$", min_length=1, max_length=32)] = "civic_"
    """Localpart prefix of the users that stand for people on other platforms;
    the appservice holds ``@<ghost_prefix>*:<server_name>`` (and the aliases
    ``#<ghost_prefix>*:<server_name>``) exclusively. The spec advises a leading
    ``_`` (e.g. ``_civic_``) so it does not clash with people's own names."""

    policy_room: Annotated[str, Meta(pattern=r"^!\S+$", max_length=255)] | None = None
    """A policy list room (``!id``) whose ``m.policy.rule.user`` and
    ``m.policy.rule.server`` rules with ``m.ban`` become ban rules the gateway
    applies to what enters from any platform. Invite the bot to it."""
    batch_max: Annotated[int, Meta(ge=1, le=100)] = 20
    """Events one delivery takes (sent one after another, in order)."""
    media_max_bytes: Annotated[int, Meta(ge=1024, le=1 << 30)] = 10 * 1024 * 1024
    """Largest attachment copied into the homeserver's media repository, and
    largest served from it to other platforms; a larger one travels as a link."""
    media_url: HttpUrl | None = None
    """Public base URL of this platform's media links (default: ``appservice_url``).
    Other platforms fetch a Matrix attachment from ``<media_url>/media/...``,
    a signed link that the gateway serves from the homeserver."""
    media_fetch_private: bool = False
    """Let the gateway fetch attachments from private, loopback and link-local
    addresses (tests, or sites on the same private network)."""

    def __post_init__(self) -> None:
        if self.as_token == self.hs_token:
            raise ValueError("`hs_token`: must differ from as_token (each side proves itself with its own token)")
        for key in ("homeserver", "appservice_url", "media_url"):
            url = getattr(self, key)
            if url is None:
                continue
            parts = check_url(key, url, ("http", "https"), example="https://matrix.example.org")
            if parts.query or parts.fragment or not parts.hostname:
                raise ValueError(f"`{key}`: expected a base URL without query or fragment, not {url!r}")
            setattr(self, key, url.rstrip("/"))
        if self.bot_localpart.startswith(self.ghost_prefix):
            raise ValueError(f"`bot_localpart`: {self.bot_localpart!r} lies in the ghost namespace "
                             f"(it starts with ghost_prefix {self.ghost_prefix!r}); a remote person could take it")
