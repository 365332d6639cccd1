"""The civic-gateway common schema (version 1) and its CloudEvents wire form.

Imports only the standard library and msgspec, so sites and other projects
can depend on it alone.
"""

from schemas.v1 import *  # noqa: F401,F403
from schemas.v1 import __all__ as _v1_all

__all__ = list(_v1_all)
