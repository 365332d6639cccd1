"""Structured logs: one JSON object a line (or plain text for a terminal)."""

from __future__ import annotations

import logging
import sys
import time

import orjson

_STD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """One line for a person: time, level, logger, message, then the same
    extra fields the JSON format has, as ``key=value`` (values with spaces,
    quotes or ``=`` JSON-quoted), so both formats carry the same facts."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = [f"{key}={_text_value(value)}" for key, value in record.__dict__.items() if key not in _STD]
        if not pairs:
            return line
        head, sep, tail = line.partition("\n")  # the traceback, if any, stays below the fields
        return f"{head} {' '.join(pairs)}{sep}{tail}"


def _text_value(value: object) -> str:
    """A string bare when it has no space, quote, ``=`` or control character,
    else JSON-quoted; anything else as compact JSON (quoted too if it has spaces)."""
    if isinstance(value, str):
        plain = value and not any(c in value for c in ' "=\\') and value.isprintable()
        return value if plain else orjson.dumps(value).decode()
    text = orjson.dumps(value, default=str).decode()
    return text if " " not in text else orjson.dumps(text).decode()


def setup(fmt: str = "json", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
