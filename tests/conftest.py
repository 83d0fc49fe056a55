"""Shared, session-scoped fixtures. Each fixture family lives in its own module under
tests/fixtures/ and is registered here, so every test module sees the same instances."""

import os

os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures.corpus",
    "tests.fixtures.tiny_models",
    "tests.fixtures.llm_server",
    "tests.fixtures.airflow",
    "tests.fixtures.open_clip_pass",
    "tests.fixtures.annotation",
]
