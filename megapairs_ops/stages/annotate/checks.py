"""Whether a model answer can be published as written.

A curator accepts a description or an instruction only if it reads as finished text: no
chat-template or special tokens, no JSON or markdown left over from the answer's format, no
unclosed fence, a sentence that ends, a length within tolerance, and (instructions) no leftover
list numbering and no talk about the prompt's image slots ("Image 1", "the second picture").
Every rejection is a short snake_case reason, recorded per attempt and in failures.parquet.

The same rules hold on every path: the numbered-list and the structured-output (JSON) answers of
the instruct step, every backend, and accepted records re-read from an earlier run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

from megapairs_ops.config import AnnotateConfig, OutputChecksConfig
from megapairs_ops.stages.annotate.parsing import normalise, strip_fence

# Openings of model refusals and disclaimers; checked at the start of the text and after
# a short lead-in, since models often refuse mid-way through a polite first clause.
_REFUSAL = re.compile(
    r"\b(?:i'?m sorry|i am sorry|sorry, (?:but )?i|as an ai\b|as a language model|i cannot|i can'?t\b|"
    r"i can not|i am unable|i'?m unable|i am not able|i'?m not able|unable to (?:view|see|process)|"
    r"i apologi[sz]e|i do not have the ability|i don'?t have the ability|"
    r"i won'?t be able|cannot (?:view|see) (?:the )?images?)",
    re.I,
)
# Any special token of the <|name|> shape, whatever family invented it.
_PIPE_TOKEN = re.compile(r"<\|[^<>|\s]{1,40}\|>")
_FENCE = "```"
_JSON_DEBRIS = re.compile(r"[{}]|\"[A-Za-z_]\w*\"\s*:|\"\s*,\s*\"|\\n")
_BRACKETS = re.compile(r"[\[\]{}]")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s", re.M)
_LIST_LINE = re.compile(r"^\s*(?:[-*•‣▪]|\(?\d{1,2}[.)])\s+\S", re.M)
_EMPHASIS = re.compile(r"\*\*|__|`")
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
_LEADING_NUMBER = re.compile(r"^\s*(?:\(?\d{1,2}[.):]\s|#\d+\b|(?:instruction|query|option)\s*#?\d+\b)", re.I)
# A list that ran together inside one item: "... cup. 2. Show me ..."
_EMBEDDED_NUMBER = re.compile(r"[.!?;:]\s+\(?\d{1,2}[.)]\s+\w")
_CLOSERS = "\"'”’»)]"
_SENTENCE_END = ".!?"


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text.strip()[:160]))


def word_count(text: str) -> int:
    return sum(1 for token in text.split() if any(ch.isalnum() for ch in token))


def ends_as_sentence(text: str) -> bool:
    return text.rstrip().rstrip(_CLOSERS)[-1:] in tuple(_SENTENCE_END)


def _phrase_pattern(phrase: str) -> str:
    words = phrase.split()
    return r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"


@dataclass(frozen=True)
class TextRules:
    """The configurable part of the checks (annotate.checks), compiled once."""

    template_tokens: tuple[str, ...] = ()
    meta_phrases: tuple[str, ...] = ()
    require_sentence_end: bool = True

    @classmethod
    def from_config(cls, checks: OutputChecksConfig) -> "TextRules":
        tokens = tuple(dict.fromkeys(t for family in checks.template_tokens.values() for t in family))
        return cls(tokens, tuple(checks.meta_phrases), checks.require_sentence_end)

    @cached_property
    def _meta(self) -> re.Pattern | None:
        if not self.meta_phrases:
            return None
        return re.compile("|".join(_phrase_pattern(p) for p in self.meta_phrases), re.I)

    def template_token(self, text: str) -> str | None:
        """The first template or special token in `text`, if any."""
        for token in self.template_tokens:
            if token in text:
                return token
        match = _PIPE_TOKEN.search(text)
        return match.group(0) if match else None

    def meta_phrase(self, text: str) -> str | None:
        match = self._meta.search(text) if self._meta is not None else None
        return match.group(0) if match else None


DEFAULT_RULES = TextRules.from_config(OutputChecksConfig())


def _format_debris(text: str) -> str:
    """Reason for JSON or markdown left in prose, '' when there is none."""
    if text.count(_FENCE) % 2:
        return "unclosed_fence"
    if _FENCE in text or _HEADING.search(text) or _EMPHASIS.search(text) or _HTML_TAG.search(text):
        return "markdown_debris"
    if _JSON_DEBRIS.search(text) or _BRACKETS.search(text):
        return "json_debris"
    return ""


def check_description(
    text: str | None, word_num: int, tolerance: float = 0.5, rules: TextRules = DEFAULT_RULES
) -> tuple[bool, str]:
    """(accepted, reason) for a describe answer asked for about `word_num` words."""
    if not text or not text.strip():
        return False, "empty_description"
    text = text.strip()
    if rules.template_token(text):
        return False, "template_token"
    if is_refusal(text):
        return False, "refusal"
    reason = _format_debris(text)
    if not reason and _LIST_LINE.search(text):
        reason = "markdown_debris"  # the prompt asks for one plain paragraph
    if reason:
        return False, reason
    if rules.require_sentence_end and not ends_as_sentence(text):
        return False, "unfinished_sentence"
    n = word_count(text)
    if n < word_num * (1 - tolerance):
        return False, "description_too_short"
    if n > word_num * (1 + tolerance):
        return False, "description_too_long"
    return True, ""


def check_answer(text: str | None, rules: TextRules = DEFAULT_RULES) -> str:
    """Reason an instruct answer is damaged as a whole before it is parsed ('' when it is not):
    a template token anywhere (also where the tolerant list parser would skip it), an unclosed
    fence, or JSON that was cut off."""
    if not text:
        return ""
    if rules.template_token(text):
        return "template_token"
    if text.count(_FENCE) % 2:
        return "unclosed_fence"
    body = strip_fence(text.strip())
    start = min((i for i in (body.find("{"), body.find("[")) if i >= 0), default=-1)
    looks_like_json = body[:1] in "[{" or '"instructions"' in body
    if looks_like_json and start >= 0 and _json_left_open(body[start:]):
        return "unclosed_json"
    return ""


def _json_left_open(text: str) -> bool:
    """Whether a JSON text ends inside a string or with brackets still open."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
    return in_string or depth > 0


def _instruction_reason(item: str, rules: TextRules) -> str:
    if rules.template_token(item):
        return "template_token"
    debris = _format_debris(item)
    if debris:
        return debris
    if _LEADING_NUMBER.search(item) or _EMBEDDED_NUMBER.search(item):
        return "leftover_numbering"
    if rules.meta_phrase(item):
        return "meta_language"
    if rules.require_sentence_end and not ends_as_sentence(item):
        return "unfinished_sentence"
    return ""


def check_instructions(
    instrs: Sequence[str], description: str, min_n: int, max_chars: int = 300, rules: TextRules = DEFAULT_RULES
) -> tuple[bool, str]:
    """(accepted, reason) for parsed instructions; every one must pass, not just `min_n`."""
    if any(is_refusal(s) for s in instrs):
        return False, "refusal"
    desc_key = normalise(description)
    distinct = {normalise(s) for s in instrs if normalise(s)}
    for key in distinct:
        # An "instruction" that is the description, or a long verbatim slice of it, teaches nothing.
        if key == desc_key or (len(key.split()) >= 12 and key in desc_key):
            return False, "copies_description"
    for item in instrs:
        reason = _instruction_reason(item, rules)
        if reason:
            return False, reason
    if any(len(s) > max_chars for s in instrs):
        return False, "instruction_too_long"
    if len(distinct) < min_n:
        return False, "too_few_instructions"
    return True, ""


def check_annotation(
    description: str | None, instructions: Sequence[str], word_num: int, acfg: AnnotateConfig, rules: TextRules
) -> str:
    """'' when a finished annotation (as published: description, instructions, WORD_NUM) passes
    every check of `acfg`, else the first reason. For annotations read back from elsewhere (the
    catalogue, a published version), whose raw answers are gone."""
    ok, reason = check_description(description, word_num, acfg.word_num_tolerance, rules)
    if ok:
        ok, reason = check_instructions(
            list(instructions or []), description or "", acfg.min_instructions, acfg.max_instruction_chars, rules
        )
    return reason


def offending_text(text: str | None, rules: TextRules = DEFAULT_RULES) -> str:
    """What a failure detail should quote: the template token or meta phrase when there is one."""
    if not text:
        return ""
    return rules.template_token(text) or rules.meta_phrase(text) or ""
