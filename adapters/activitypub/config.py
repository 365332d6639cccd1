"""Settings of the fediverse side (``[platforms.NAME]`` with ``kind = "activitypub"``).

A link names a fediverse group in one of two ways (docs/activitypub.md):

* a plain name (``{platform = "fedi", group = "buurt"}``): the gateway
  **hosts** that group as a ``Group`` actor, ``<base_url>/ap/groups/buurt``
  (``@buurt@<host>``); fediverse people follow it to join;
* an actor URL (``group = "https://lemmy.example/c/buurt"``): the gateway
  **joins** that remote group as a member and posts into it.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

from gateway.kit import check_url

HttpUrl = Annotated[str, Meta(max_length=2048)]
"""A URL, checked by ``gateway.config.check_url`` in ``__post_init__``."""


class GroupSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(max_length=256)] | None = None
    """The display name of a hosted group (default: its name in the link)."""
    summary: Annotated[str, Meta(max_length=4096)] | None = None
    """What the group is about, shown on its profile."""


class ActivityPubConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    base_url: HttpUrl
    """The public ``https://`` address the fediverse reaches the gateway at (TLS
    in front, e.g. ``https://gateway.example.org``): every actor and object id
    the gateway mints starts with it, so it must never change."""
    groups: dict[str, GroupSettings] = {}
    """Profiles of hosted groups, by their name in the links."""
    allow_private_addresses: bool = False
    """Let the gateway fetch from and deliver to private, loopback and
    link-local addresses (tests, or a fediverse server on the same private
    network). Off, such addresses are refused before connecting."""
    max_body: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = 1024 * 1024
    """Largest activity (request or fetched document) read, in bytes."""
    max_depth: Annotated[int, Meta(ge=4, le=256)] = 32
    """Deepest JSON nesting accepted."""
    signature_window: Annotated[float, Meta(ge=30, le=43200)] = 3600.0
    """Seconds a signed request's ``Date`` (or ``created``) may be off the
    gateway's clock, either way (Mastodon allows 12 h; one hour is the default)."""
    timeout: Annotated[float, Meta(gt=0, le=120)] = 10.0
    """Seconds to wait for another server (fetches and deliveries)."""
    retry_max_age: Annotated[float, Meta(ge=60)] = 3 * 86400.0
    """A delivery still failing after this long is given up (Mastodon retries for about 3 days)."""

    def __post_init__(self) -> None:
        # https only; plain http on a loopback host is accepted with a warning (tests).
        parts = check_url("base_url", self.base_url, ("https", "http"), public_tls=True,
                          example="https://gateway.example.org")
        if parts.query or parts.fragment or not parts.hostname or (parts.path not in ("", "/")):
            raise ValueError(f"`base_url`: expected a scheme and host only, e.g. \"https://gateway.example.org\", "
                             f"not {self.base_url!r}")
        self.base_url = self.base_url.rstrip("/")
        for name in self.groups:
            if name.startswith(("http://", "https://")):
                raise ValueError(f"`groups.{name}`: settings are for hosted groups (plain names), not remote ones")
