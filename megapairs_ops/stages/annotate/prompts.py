"""Versioned prompt sets (megapairs_ops/prompts/<version>/) and the per-pair random draws.

A prompt set is data, not code: a new wording is a new folder, and every annotation row records the
version it was made with. The draws (word count, demonstrations) are derived from a stable hash of a
seed key so that a re-run, or a resumed run, asks the models exactly the same questions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from megapairs_ops.errors import ConfigError

PROMPTS_ROOT = Path(__file__).resolve().parents[2] / "prompts"  # package data: megapairs_ops/prompts/
POOL_SIZE = 50

DESCRIBE_FILE = "describe.txt"
INSTRUCT_FILE = "instruct.txt"
DEMOS_FILE = "demos.jsonl"

# How the instruct step is asked to answer: a numbered list by default, a JSON object when the
# endpoint enforces structured output (the parser accepts both either way).
OUTPUT_FORMATS = {
    "list": "Answer with a numbered list (1., 2., 3., ...), one instruction per line, and nothing else.",
    "json": 'Answer with a JSON object of the form {"instructions": ["...", "...", "..."]} and nothing else.',
}


class PromptError(ConfigError):
    """A prompt set is missing or malformed; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Demo:
    description: str
    instructions: tuple[str, ...]


@dataclass(frozen=True)
class PromptSet:
    describe_template: str
    instruct_template: str
    demos: tuple[Demo, ...]
    version: str

    def render_describe(self, word_num: int) -> str:
        return _fill(self.describe_template, word_num=str(word_num))

    def render_instruct(self, demos: Sequence[Demo], description: str, structured: bool = False) -> str:
        return _fill(
            self.instruct_template,
            demos=format_demos(demos, structured),
            description=description.strip(),
            output_format=OUTPUT_FORMATS["json" if structured else "list"],
        )


def _fill(template: str, **values: str) -> str:
    # str.format would choke on the braces of JSON examples inside templates or values.
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


def format_demos(demos: Sequence[Demo], structured: bool = False) -> str:
    blocks = []
    for demo in demos:
        if structured:
            answer = json.dumps({"instructions": list(demo.instructions)}, ensure_ascii=False)
        else:
            answer = "\n".join(f"{i}. {text}" for i, text in enumerate(demo.instructions, 1))
        blocks.append(f"Description: {demo.description}\nInstructions:\n{answer}")
    return "\n\n".join(blocks)


_REQUIRED_PLACEHOLDERS = {
    DESCRIBE_FILE: ("{word_num}",),
    INSTRUCT_FILE: ("{demos}", "{description}", "{output_format}"),
}


def load_prompt_set(version: str, root: Path | None = None) -> PromptSet:
    base = Path(root) if root is not None else PROMPTS_ROOT
    folder = base / version
    if not folder.is_dir():
        have = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        raise PromptError(f"prompt version '{version}' not found under {base} (have: {have})")
    texts = {}
    for name, needed in _REQUIRED_PLACEHOLDERS.items():
        path = folder / name
        if not path.is_file():
            raise PromptError(f"{path}: missing; every prompt version needs {name}")
        text = path.read_text(encoding="utf-8").strip()
        missing = [p for p in needed if p not in text]
        if missing:
            raise PromptError(f"{path}: placeholder(s) {', '.join(missing)} missing")
        texts[name] = text
    demos = _load_demos(folder / DEMOS_FILE)
    return PromptSet(texts[DESCRIBE_FILE], texts[INSTRUCT_FILE], demos, version)


def _load_demos(path: Path) -> tuple[Demo, ...]:
    if not path.is_file():
        raise PromptError(f"{path}: missing; every prompt version needs a pool of {POOL_SIZE} demos")
    demos = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            description = row["description"].strip()
            instructions = tuple(s.strip() for s in row["instructions"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise PromptError(
                f"{path}:{lineno}: expected {{\"description\": str, \"instructions\": [str, ...]}} ({exc})"
            ) from None
        if not description or len(instructions) < 1 or not all(instructions):
            raise PromptError(f"{path}:{lineno}: empty description or instruction")
        demos.append(Demo(description, instructions))
    if len(demos) != POOL_SIZE:
        raise PromptError(f"{path}: demo pool has {len(demos)} entries; the method needs exactly {POOL_SIZE}")
    return tuple(demos)


def stable_hash(seed_key: str) -> int:
    """64 bits from sha256: unlike hash(), identical across processes and Python versions."""
    return int.from_bytes(hashlib.sha256(seed_key.encode("utf-8")).digest()[:8], "big")


def draw_demo_indices(pool_size: int, n: int, seed_key: str) -> list[int]:
    """n distinct positions in the pool; the same key always gives the same ones in the same order."""
    if n > pool_size:
        raise ValueError(f"cannot draw {n} demos from a pool of {pool_size}")
    order = sorted(range(pool_size), key=lambda i: stable_hash(f"{seed_key}:demo:{i}"))
    return order[:n]


def draw_demos(pool: Sequence[Demo], n: int, seed_key: str) -> list[Demo]:
    return [pool[i] for i in draw_demo_indices(len(pool), n, seed_key)]


def draw_word_num(lo: int, hi: int, seed_key: str) -> int:
    if lo > hi:
        raise ValueError(f"word_num range [{lo}, {hi}] is empty")
    return lo + stable_hash(f"{seed_key}:word_num") % (hi - lo + 1)


def seed_key(run_seed: int, pair_id: str) -> str:
    return f"{run_seed}:{pair_id}"
