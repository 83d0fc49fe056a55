"""Annotation building blocks: versioned prompts, output parsing and checks, model backends.

The stage itself (batching, retries, resumable parts) lives in `megapairs_ops.annotate`.
Backends are imported lazily by `make_backend`, so importing this package loads no model library.
"""

from megapairs_ops.stages.annotate.backends import (
    Backend,
    BackendError,
    DescribeRequest,
    EndpointUnavailable,
    InstructRequest,
    Result,
    image_data_url,
    load_image,
    make_backend,
)
from megapairs_ops.stages.annotate.checks import TextRules, check_answer, check_description, check_instructions, is_refusal
from megapairs_ops.stages.annotate.parsing import instructions_schema, normalise, parse_instructions
from megapairs_ops.stages.annotate.prompts import Demo, PromptError, PromptSet, draw_demos, draw_word_num, load_prompt_set, seed_key

__all__ = [
    "Backend",
    "BackendError",
    "Demo",
    "DescribeRequest",
    "EndpointUnavailable",
    "InstructRequest",
    "PromptError",
    "PromptSet",
    "Result",
    "TextRules",
    "check_answer",
    "check_description",
    "check_instructions",
    "draw_demos",
    "draw_word_num",
    "image_data_url",
    "instructions_schema",
    "is_refusal",
    "load_image",
    "load_prompt_set",
    "make_backend",
    "normalise",
    "parse_instructions",
    "seed_key",
]
