"""What the annotate stage and its backends share: requests, results, the steps and the errors.
A leaf module: it imports nothing else of the stage, so every part of it can import this."""

from __future__ import annotations

from dataclasses import dataclass

from megapairs_ops.errors import CredentialsError, TransientError
from megapairs_ops.stages.annotate.prompts import stable_hash

STEPS = ("describe", "instruct")


class BackendError(CredentialsError):
    """A backend cannot be set up or used at all (missing API key, rejected credentials, a model
    the endpoint does not serve, unknown backend): stops the stage instead of failing every pair."""


class EndpointUnavailable(TransientError, RuntimeError):
    """The endpoint stayed down longer than `outage_timeout_s`; the work item stops with every
    finished record kept, so a retried task resumes where this one stopped."""


class ImageLoadError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _Seeded:
    seed_key: str

    @property
    def seed(self) -> int:
        return stable_hash(self.seed_key) % 2**31


@dataclass(frozen=True)
class DescribeRequest(_Seeded):
    pair_id: str
    seed_key: str  # pair, run seed and attempt: a retry is a fresh sample, a re-run the same one
    prompt: str
    word_num: int
    q_image: str  # image refs as written in images.parquet `path`
    t_image: str
    q_caption: str
    t_caption: str


@dataclass(frozen=True)
class InstructRequest(_Seeded):
    pair_id: str
    seed_key: str
    prompt: str
    description: str
    q_caption: str
    t_caption: str
    # Bounds of the JSON schema sent when structured output is on.
    min_instructions: int = 3
    max_chars: int = 300


@dataclass(frozen=True)
class Result:
    text: str | None
    model: str
    error: str | None = None  # snake_case kind: timeout, server_error, bad_response, corrupt_image, ...
    detail: str = ""
    # False when asking again cannot help (the image itself is unreadable).
    retryable: bool = True
    tokens_in: int = 0
    tokens_out: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


# Completion endings that make an answer unusable whatever its text: cut off by max_tokens
# ("length"), or withheld or cut by the provider's filter ("content_filter"). Such an answer is a
# failed attempt, re-sampled like any other bad output.
FINISH_FAILURES = {"length": "truncated", "content_filter": "content_filter"}


def completion_result(
    text: str | None, model: str, finish_reason: str | None, max_tokens: int, tokens_in: int = 0, tokens_out: int = 0
) -> Result:
    """A model's answer as a Result, failed when the model did not finish it."""
    reason = FINISH_FAILURES.get(finish_reason or "")
    if reason is None:
        return Result(text, model, tokens_in=tokens_in, tokens_out=tokens_out)
    shown = repr((text or "")[-120:])
    detail = f"finish_reason={finish_reason} after {tokens_out or '?'} tokens (max_tokens={max_tokens}); ends {shown}"
    # The text stays for inspection; a Result with an error is never used as an answer.
    return Result(text, model, reason, detail, tokens_in=tokens_in, tokens_out=tokens_out)
