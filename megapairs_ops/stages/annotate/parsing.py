"""Turning model text into instructions: a JSON array or {"instructions": [...]}, or a numbered or
bulleted list in the formats chat models write. Whether the result is usable is checks.py's call."""

from __future__ import annotations

import json
import re

_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```\s*$", re.S)
_ITEM = re.compile(r"^\s*(?:\(?\d{1,2}[.):]|[-*•‣▪–])\s+(.*\S)\s*$")
_LABEL = re.compile(r"^(?:instruction|query|option)\s*#?\d*\s*[:.\-–]\s*", re.I)
_MARKUP = re.compile(r"\*\*|__|`")
_QUOTES = "\"'“”‘’«»"
_TRAILING = " \t.,;:!?…"


def instructions_schema(min_n: int = 3, max_chars: int = 300) -> dict:
    """JSON schema for structured output: {"instructions": [>= min_n non-empty strings]}.
    Distinctness is not in the schema (`uniqueItems` is not supported by vLLM's grammar
    backends); check_instructions enforces it after normalisation."""
    return {
        "type": "object",
        "properties": {
            "instructions": {
                "type": "array",
                "items": {"type": "string", "minLength": 1, "maxLength": max_chars},
                "minItems": min_n,
                "maxItems": max(min_n, 8),
            }
        },
        "required": ["instructions"],
        "additionalProperties": False,
    }


def normalise(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(_TRAILING)


def _clean(item: str) -> str:
    item = _MARKUP.sub("", item).strip()
    item = _LABEL.sub("", item).strip()
    # Strip matching outer quotes only, so an instruction that quotes a sign's text keeps them.
    while len(item) >= 2 and item[0] in _QUOTES and item[-1] in _QUOTES:
        item = item[1:-1].strip()
    return " ".join(item.split())


def _from_json(text: str) -> list[str] | None:
    candidates = [text]
    for open_ch, close_ch in (("[", "]"), ("{", "}")):
        start, end = text.find(open_ch), text.rfind(close_ch)
        if 0 <= start < end:
            candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(value, dict):
            value = value.get("instructions")
        if isinstance(value, list):
            return [v for v in value if isinstance(v, str)]
    return None


def _from_lines(text: str) -> list[str]:
    items: list[list[str]] = []  # each item: its first line and the lines it wraps onto
    current: list[str] | None = None
    for line in text.splitlines():
        match = _ITEM.match(line)
        if match:
            current = [match.group(1)]
            items.append(current)
        elif not line.strip():
            current = None
        elif current is not None:
            # A wrapped item continues on the next line; a blank line ends it.
            current.append(line.strip())
    if items:
        return [" ".join(parts) for parts in items]
    # No list markers at all: one instruction per line, minus lead-ins such as "Here are three:".
    return [line for line in text.splitlines() if line.strip() and not line.rstrip().endswith(":")]


def strip_fence(text: str) -> str:
    """The inside of a text that is one fenced block, else the text itself."""
    fenced = _FENCE.match(text)
    return fenced.group(1).strip() if fenced else text


def parse_instructions(text: str | None) -> list[str]:
    """Instructions from a JSON array / {"instructions": [...]} or a numbered or bulleted list."""
    if not text or not text.strip():
        return []
    text = strip_fence(text.strip())
    raw = _from_json(text) if text[:1] in "[{" or '"instructions"' in text else None
    if raw is None:
        raw = _from_lines(text)
    seen: set[str] = set()
    out: list[str] = []
    for item in raw:
        cleaned = _clean(item)
        key = normalise(cleaned)
        if key and key not in seen:
            seen.add(key)
            out.append(cleaned)
    return out
