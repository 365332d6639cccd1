"""The appservice registration file a homeserver loads (``app_service_config_files``).

Pure: settings in, YAML text out. Fields as in the Matrix spec, Application
Service API, Registration (``data/api/application-service/definitions/
registration.yaml``): required ``id``, ``url``, ``as_token``, ``hs_token``,
``sender_localpart``, ``namespaces`` (``users`` / ``aliases`` / ``rooms``, each
a list of ``{exclusive, regex}``); optional ``rate_limited`` and
``receive_ephemeral`` (spec v1.13, default false).

``COMMAND`` is the hook behind ``civic-gateway matrix registration``: the CLI
finds it through the ``civic_gateway.commands`` entry-point group (see
``gateway.registry.find_command``), so the core imports nothing of Matrix.
"""

from __future__ import annotations

import json
import re
from typing import Any

from adapters.matrix.config import MatrixConfig
from gateway.kit import PlatformCommand


def user_regex(config: MatrixConfig) -> str:
    """The exclusive user namespace: every ghost ``@<ghost_prefix>...:<server_name>``.

    Anchored at both ends: Synapse matches from the start only, other
    homeservers anywhere in the id, and ``@civic_x:example.org.evil`` is not ours."""
    return f"^@{re.escape(config.ghost_prefix)}.*:{re.escape(config.server_name)}$"


def alias_regex(config: MatrixConfig) -> str:
    """The exclusive alias namespace: ``#<ghost_prefix>...:<server_name>``."""
    return f"^#{re.escape(config.ghost_prefix)}.*:{re.escape(config.server_name)}$"


def registration(config: MatrixConfig) -> dict[str, Any]:
    """The registration as data (the same content ``registration_yaml`` writes)."""
    return {
        "id": config.id,
        "url": config.appservice_url,
        "as_token": config.as_token,
        "hs_token": config.hs_token,
        "sender_localpart": config.bot_localpart,
        "namespaces": {
            "users": [{"exclusive": True, "regex": user_regex(config)}],
            "aliases": [{"exclusive": True, "regex": alias_regex(config)}],
            "rooms": [],
        },
        # Ghosts speak for many people at once: the homeserver's per-user
        # limits would throttle the whole bridge (the bot is exempt anyway).
        "rate_limited": False,
        # Typing, receipts and presence are not carried across platforms.
        "receive_ephemeral": False,
    }


def _scalar(value: Any) -> str:
    # A JSON string, number or boolean is also a valid YAML flow scalar (double
    # quotes, backslash escapes): regexes keep their backslashes intact.
    return json.dumps(value)


def registration_yaml(config: MatrixConfig, platform: str | None = None) -> str:
    """The registration file's text (YAML, with comments for the operator)."""
    reg = registration(config)
    ns = reg["namespaces"]
    source = f" for [platforms.{platform}]" if platform else ""
    lines = [
        f"# Matrix appservice registration of civic-gateway{source}.",
        "# Written by `civic-gateway matrix registration`; it holds both secret tokens (keep it 0600).",
        "# Add its path to the homeserver's app_service_config_files and restart the homeserver.",
        *(f"{key}: {_scalar(reg[key])}" for key in
          ("id", "url", "as_token", "hs_token", "sender_localpart", "rate_limited", "receive_ephemeral")),
        "namespaces:",
    ]
    for kind in ("users", "aliases", "rooms"):
        if not ns[kind]:
            lines.append(f"  {kind}: []")
            continue
        lines.append(f"  {kind}:")
        for entry in ns[kind]:
            lines.append(f"    - exclusive: {_scalar(entry['exclusive'])}")
            lines.append(f"      regex: {_scalar(entry['regex'])}")
    return "\n".join(lines) + "\n"


class RegistrationCommand:
    """``civic-gateway matrix registration``: the hook the CLI calls with one
    ``kind = "matrix"`` platform's validated settings (see
    ``gateway.kit.PlatformCommand``)."""

    Config = MatrixConfig
    help = "write the appservice registration YAML for the homeserver's app_service_config_files"
    secret = True  # the output holds tokens: the CLI writes the file 0600

    def __call__(self, platform: str, config: MatrixConfig) -> str:
        return registration_yaml(config, platform)


COMMAND: PlatformCommand = RegistrationCommand()
