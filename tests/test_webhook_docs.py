"""docs/webhook.md promises one valid example per event type in docs/examples/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from schemas.cloudevents import single_decoder
from schemas.v1 import EVENT_TYPES

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
FILES = sorted(EXAMPLES.glob("*.json"))


def test_every_event_type_has_an_example() -> None:
    assert {f.stem for f in FILES} == set(EVENT_TYPES)


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_example_decodes_as_its_event_type(path: Path) -> None:
    event = single_decoder.decode(path.read_bytes())
    assert event.__struct_config__.tag == path.stem
    assert isinstance(event.data, EVENT_TYPES[path.stem])  # type: ignore[attr-defined]


def test_docs_name_every_event_type() -> None:
    text = (EXAMPLES.parent / "webhook.md").read_text(encoding="utf-8")
    missing = [t for t in EVENT_TYPES if t not in text]
    assert not missing, f"docs/webhook.md does not mention {missing}"


def test_every_cloudevent_in_the_docs_decodes() -> None:
    text = (EXAMPLES.parent / "webhook.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```json\n(.*?)```", text, re.S) if '"specversion"' in b]
    assert len(blocks) >= 11  # the ten types, plus what the gateway sends
    for block in blocks:
        single_decoder.decode(block.encode())


def test_inline_examples_match_the_example_files() -> None:
    text = (EXAMPLES.parent / "webhook.md").read_text(encoding="utf-8")
    for path in FILES:
        assert path.read_text(encoding="utf-8").strip() in text, f"docs/webhook.md differs from {path.name}"
