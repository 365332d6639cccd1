"""Configuration: one TOML file, validated into typed structs.

``[gateway]`` holds the process settings, ``[platforms.NAME]`` one platform
instance each (``kind`` picks the adapter, the rest is that adapter's
settings), ``[[links]]`` the groups that behave as one. Unknown keys are
errors (a typo must not silently fall back to a default), and every error
names the key and, when it can be found, its line.

``settings`` holds the structs, ``urls`` the one check of URL-valued settings,
``loading`` the reading and the error messages; import the names from here.
"""

from gateway.config.loading import load, parse, resolve_database, validate_adapters
from gateway.config.settings import Config, GatewaySettings, GroupConfig, LinkConfig, Name, PlatformConfig
from gateway.config.urls import check_url, is_loopback, warn

__all__ = ["Config", "GatewaySettings", "GroupConfig", "LinkConfig", "Name", "PlatformConfig", "check_url",
           "is_loopback", "load", "parse", "resolve_database", "validate_adapters", "warn"]
