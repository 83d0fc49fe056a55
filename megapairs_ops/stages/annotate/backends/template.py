"""The offline BASELINE annotator of the demo profile: no model, captions only.

It exists so the whole pipeline runs anywhere in minutes. It never looks at pixels: its
"description" says so in its first sentence, and it only knows what the two captions share and
where they differ. Its output is a stand-in for InternVL2 + Llama-3, not an imitation of them.
"""

from __future__ import annotations

import re
from typing import Sequence

from megapairs_ops.stages.annotate.backends import Backend, DescribeRequest, InstructRequest, Result
from megapairs_ops.stages.annotate.prompts import stable_hash

MODEL_NAME = "template-baseline-v1"

_STOPWORDS = frozenset(
    """a an the and or but nor of in on at to for from by with without into onto over under above below
    near next beside behind between among through across along around about against up down out off
    this that these those there here it its is are was were be been being has have had do does did
    his her their our your my some any each every all both few many much more most other another such
    very just only also than then too while where when which who whom whose what how why not no yes
    can could will would shall should may might must one two three four five six seven eight nine ten
    image images photo photos photograph picture pictures shot view shows showing shown depicts
    depicting featuring features seen looking close closeup up-close stock background foreground
    """.split()
)
_WORD = re.compile(r"[a-z][a-z\-']*[a-z]")

_PREAMBLES = (
    "This is a caption-derived baseline description; no vision model looked at the two images.",
    "Baseline text built from the two captions only, without looking at the pictures themselves.",
    "Caption-only baseline: the images were not inspected, so this compares what their captions say.",
)
_FILLERS = (
    "Colour, viewpoint, lighting and style cannot be judged from captions, so no claim is made about them.",
    "Anything absent from both captions is unknown to this baseline and may still differ between the images.",
    "A model-based annotator would compare the pixels; this one only compares the wording of the captions.",
    "The shared words suggest the common ground, and the caption-specific words suggest the change.",
)

# Instruction patterns keyed by the slots they need: X shared words, Y target-only, Z query-only.
_PATTERNS: tuple[tuple[frozenset[str], str], ...] = (
    (frozenset("XYZ"), "Find an image that also shows {X}, but with {Y} instead of {Z}."),
    (frozenset("XYZ"), "Show me a picture with the same {X} where {Y} replaces {Z}."),
    (frozenset("YZ"), "Retrieve a similar scene featuring {Y} rather than {Z}."),
    (frozenset("XYZ"), "Keep the {X}, but swap {Z} for {Y}."),
    (frozenset("XY"), "Find another image of {X}, this time with {Y}."),
    (frozenset("XY"), "Show me a related photo that still has {X} and adds {Y}."),
    (frozenset("Y"), "I am looking for a version of this that shows {Y}."),
    (frozenset("YZ"), "Change {Z} to {Y} and find that image."),
    (frozenset("X"), "Find a different image that also contains {X}."),
    (frozenset("XZ"), "Show me {X} again, but without {Z}."),
    (frozenset(), "Find a closely related image with a different composition."),
    (frozenset(), "Show me a similar picture that changes some of its details."),
    (frozenset(), "Retrieve another image close to this one, but not the same shot."),
)


def content_words(caption: str) -> list[str]:
    """Distinct lower-case content words of a caption, in order of first appearance."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(caption.casefold()):
        if len(word) > 2 and word not in _STOPWORDS:
            seen.setdefault(word, None)
    return list(seen)


def caption_overlap(q_caption: str, t_caption: str) -> tuple[list[str], list[str], list[str]]:
    """(shared, query-only, target-only) content words."""
    q_words, t_words = content_words(q_caption or ""), content_words(t_caption or "")
    q_set, t_set = set(q_words), set(t_words)
    return (
        [w for w in q_words if w in t_set],
        [w for w in q_words if w not in t_set],
        [w for w in t_words if w not in q_set],
    )


def _join(words: Sequence[str]) -> str:
    words = list(words)
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _ordered(items: Sequence, key: str) -> list:
    return sorted(items, key=lambda item: stable_hash(f"{key}:{item}"))


def _n_words(text: str) -> int:
    return len(text.split())


def _truncate(text: str, n: int) -> str:
    words = text.split()
    return text if len(words) <= n else " ".join(words[:n]) + " ..."


def template_description(req: DescribeRequest) -> str:
    shared, only_q, only_t = caption_overlap(req.q_caption, req.t_caption)
    key = req.seed_key
    pick = stable_hash(key)
    parts = [_PREAMBLES[pick % len(_PREAMBLES)]]
    parts.append(
        f"Both captions mention {_join(shared[:8])}, so the two images probably share these elements."
        if shared
        else "The two captions share no content words, so what the images have in common is not stated."
    )
    parts.append(
        f"Only the query caption mentions {_join(only_q[:8])}."
        if only_q
        else "The query caption names nothing that the target caption lacks."
    )
    parts.append(
        f"Only the target caption mentions {_join(only_t[:8])}, which is where the target seems to differ."
        if only_t
        else "The target caption adds nothing new, so any difference is not visible in the text."
    )
    # Quote the captions with whatever room is left, so the length lands near word_num.
    room = max(req.word_num - sum(_n_words(p) for p in parts) - 8, 0)
    per_caption = room // 2
    if per_caption >= 3:
        parts.append(f'The query caption reads: "{_truncate(req.q_caption.strip(), per_caption)}".')
        parts.append(f'The target caption reads: "{_truncate(req.t_caption.strip(), per_caption)}".')
    for filler in _ordered(_FILLERS, key):
        if sum(_n_words(p) for p in parts) >= 0.85 * req.word_num:
            break
        parts.append(filler)
    return " ".join(parts)


def template_instructions(req: InstructRequest, n: int) -> list[str]:
    shared, only_q, only_t = caption_overlap(req.q_caption, req.t_caption)
    slots = {"X": _join(shared[:3]), "Y": _join(only_t[:3]), "Z": _join(only_q[:2])}
    have = {name for name, value in slots.items() if value}
    usable = [tmpl for needs, tmpl in _PATTERNS if needs <= have]
    # Prefer patterns that use the most of what the captions offer; generic ones only fill gaps.
    usable.sort(key=lambda tmpl: (-sum(f"{{{s}}}" in tmpl for s in "XYZ"), stable_hash(f"{req.seed_key}:{tmpl}")))
    top = _ordered(usable[: max(n + 2, 5)], req.seed_key)
    out: list[str] = []
    for tmpl in top + usable:
        text = tmpl.format(**slots)
        if text not in out:
            out.append(text)
        if len(out) == n:
            break
    return out


class TemplateBackend(Backend):
    """Caption-derived baseline; deterministic for a given request seed key."""

    kind = "template"
    model_name = MODEL_NAME

    def describe(self, requests: Sequence[DescribeRequest]) -> list[Result]:
        self.count("describe", len(requests))
        return [Result(template_description(r), MODEL_NAME) for r in requests]

    def instruct(self, requests: Sequence[InstructRequest]) -> list[Result]:
        self.count("instruct", len(requests))
        results = []
        for r in requests:
            n = 3 + stable_hash(r.seed_key + ":n") % 2
            lines = template_instructions(r, n)
            results.append(Result("\n".join(f"{i}. {s}" for i, s in enumerate(lines, 1)), MODEL_NAME))
        return results
