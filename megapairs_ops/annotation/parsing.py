"""Turning model text into instructions, and deciding whether an output is usable.

Every rejection has a short snake_case reason so failures can be counted and filtered.
"""

from __future__ import annotations

import json
import re

_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```\s*$", re.S)
_ITEM = re.compile(r"^\s*(?:\(?\d{1,2}[.):]|[-*•‣▪–])\s+(.*\S)\s*$")
_LABEL = re.compile(r"^(?:instruction|query|option)\s*#?\d*\s*[:.\-–]\s*", re.I)
_MARKUP = re.compile(r"\*\*|__|`")
_QUOTES = "\"'“”‘’«»"
_TRAILING = " \t.,;:!?…"

# Openings of model refusals and disclaimers; checked at the start of the text and after
# a short lead-in, since models often refuse mid-way through a polite first clause.
_REFUSAL = re.compile(
    r"\b(?:i'?m sorry|i am sorry|sorry, (?:but )?i|as an ai\b|as a language model|i cannot|i can'?t\b|"
    r"i can not|i am unable|i'?m unable|i am not able|i'?m not able|unable to (?:view|see|process)|"
    r"i apologi[sz]e|i do not have the ability|i don'?t have the ability|"
    r"i won'?t be able|cannot (?:view|see) (?:the )?images?)",
    re.I,
)


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
    items: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        match = _ITEM.match(line)
        if match:
            current = [match.group(1)]
            items.append(current)  # type: ignore[arg-type]
        elif not line.strip():
            current = None
        elif current is not None:
            # A wrapped item continues on the next line; a blank line ends it.
            current.append(line.strip())
    if items:
        return [" ".join(parts) for parts in items]  # type: ignore[union-attr]
    # No list markers at all: one instruction per line, minus lead-ins such as "Here are three:".
    return [line for line in text.splitlines() if line.strip() and not line.rstrip().endswith(":")]


def parse_instructions(text: str | None) -> list[str]:
    """Instructions from a JSON array / {"instructions": [...]} or a numbered or bulleted list."""
    if not text or not text.strip():
        return []
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
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


def is_refusal(text: str) -> bool:
    head = text.strip()[:160]
    return bool(_REFUSAL.search(head))


def word_count(text: str) -> int:
    return sum(1 for token in text.split() if any(ch.isalnum() for ch in token))


def check_description(text: str | None, word_num: int, tolerance: float = 0.5) -> tuple[bool, str]:
    if not text or not text.strip():
        return False, "empty_description"
    if is_refusal(text):
        return False, "refusal"
    n = word_count(text)
    lo, hi = word_num * (1 - tolerance), word_num * (1 + tolerance)
    if n < lo:
        return False, "description_too_short"
    if n > hi:
        return False, "description_too_long"
    return True, ""


def check_instructions(
    instrs: list[str], description: str, min_n: int, max_chars: int = 300
) -> tuple[bool, str]:
    if any(is_refusal(s) for s in instrs):
        return False, "refusal"
    desc_key = normalise(description)
    distinct = {normalise(s) for s in instrs if normalise(s)}
    for key in distinct:
        # An "instruction" that is the description, or a long verbatim slice of it, teaches nothing.
        if key == desc_key or (len(key.split()) >= 12 and key in desc_key):
            return False, "copies_description"
    if any(len(s) > max_chars for s in instrs):
        return False, "instruction_too_long"
    if len(distinct) < min_n:
        return False, "too_few_instructions"
    return True, ""
