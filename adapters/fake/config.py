"""Settings of one fake platform (``[platforms.NAME]`` with ``kind = "fake"``).

Every capability is a setting, so a test can declare what the platform lacks
(``html = false``, ``content_warning = "first_line"``, ...) and see the
gateway, and the adapter, fit events to it."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct


class FakeConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    html: bool = True
    """Carries rich text; without it only the plain text is kept."""
    content_warning: Literal["native", "first_line"] = "native"
    """native: a ``cw`` field of its own; first_line: "CW: ..." before the text."""
    reactions: bool = True
    """Without reactions they are not sent (never turned into anything else)."""
    edits: bool = True
    """Without edits an edit is posted as a new message marked as a correction."""
    threads: bool = True
    """Without threads a thread root is sent as what the message replies to."""
    batch_max: Annotated[int, Meta(ge=1, le=1000)] = 10
    """Most events one delivery takes."""
    id_prefix: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9]{0,15}$")] = "fk"
    """The platform's ids look like ``<id_prefix>:<n>``."""
