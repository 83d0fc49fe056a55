"""Config of mining (k-NN per view), pairs (union, dedup, negatives) and the DuckDB sessions that
pairs, publish, the catalogue, the embedding cache and the report run."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from .base import RUNTIME, MemorySize, Strict


class MiningConfig(Strict):
    """k-NN mining; how the index is chosen from these keys is documented in docs/mining.md."""

    k: Annotated[int, Field(ge=1, le=4096)] = 20
    max_targets_per_query: Annotated[int, Field(ge=1)] = 5
    n_hard_negatives: Annotated[int, Field(ge=0, le=64)] = 5
    query_batch_size: Annotated[int, Field(ge=1), RUNTIME] = 4096
    index: Literal["auto", "flat", "ivf_flat", "ivf_pq"] = "auto"
    device: Annotated[Literal["auto", "cpu", "cuda"], RUNTIME] = "auto"
    # Host memory the search may hold (index shard, running top-k, ids, one query batch).
    memory_budget: Annotated[MemorySize, RUNTIME] = "4GB"
    # `index: auto` stays exact up to this many vectors, then goes approximate.
    exact_max_vectors: Annotated[int, Field(ge=2)] = 1_000_000
    recall_target: Annotated[float, Field(gt=0.0, le=1.0)] = 0.95
    nlist: Annotated[int, Field(ge=1)] | None = None
    nprobe: Annotated[int, Field(ge=1)] | None = None
    train_size: Annotated[int, Field(ge=1)] | None = None
    pq_m: Annotated[int, Field(ge=1)] | None = None
    # IVF-PQ fetches rerank_factor x (k + 1) codes-ranked neighbours and re-ranks them exactly.
    rerank_factor: Annotated[int, Field(ge=1, le=64)] = 4
    # Queries with exact ground truth used to pick nprobe and to measure recall (0: no calibration).
    calibration_queries: Annotated[int, Field(ge=0)] = 1000
    # Exact search: database rows per index shard; None derives it from memory_budget.
    shard_rows: Annotated[int | None, Field(ge=1), RUNTIME] = None
    # Query rows per work item (one mapped Airflow task each).
    queries_per_task: Annotated[int, Field(ge=1), RUNTIME] = 2_000_000
    gpus: Annotated[int | None, Field(ge=1), RUNTIME] = None
    gpu_float16: bool = False
    # Reuse the exact neighbours of a published version under the same output root: only new
    # images are searched against the whole corpus, old queries only against the new images
    # (docs/mining.md). The result equals a full search, so it is a runtime knob.
    incremental: Annotated[bool, RUNTIME] = True

    @model_validator(mode="after")
    def _k_covers_negatives(self) -> "MiningConfig":
        if self.k < self.max_targets_per_query:
            raise ValueError(
                f"k ({self.k}) must be >= max_targets_per_query ({self.max_targets_per_query})"
            )
        if self.nlist and self.nprobe and self.nprobe > self.nlist:
            raise ValueError(f"nprobe ({self.nprobe}) must be <= nlist ({self.nlist})")
        return self


class PairsConfig(Strict):
    max_pairs_per_query: Annotated[int, Field(ge=1)] = 5
    # Two images whose 64-bit perceptual hashes differ in at most this many bits are the same picture.
    near_duplicate_hamming: Annotated[int, Field(ge=0, le=64)] = 6

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: object) -> object:
        moved = sorted({"memory_limit", "threads", "temp_directory"} & set(data)) if isinstance(data, dict) else []
        if moved:
            raise ValueError(f"{', '.join(moved)} moved to the duckdb section (one budget for every DuckDB session)")
        return data


class DuckDBConfig(Strict):
    """Every DuckDB session of a task (pairs, publish, the catalogue, curation, the embedding
    cache, incremental mining, the report) opens with these settings (db.py)."""

    # DuckDB's buffer limit; it spills to temp_directory beyond it (the process peaks a little
    # higher).
    memory_limit: Annotated[MemorySize, RUNTIME] = "2GB"
    threads: Annotated[int | None, Field(ge=1, le=1024), RUNTIME] = None
    # Spill folder; None: <run dir>/tmp/<stage>, emptied when the stage starts. A relative path
    # is taken from the run directory.
    temp_directory: Annotated[str | None, RUNTIME] = None


__all__ = ["DuckDBConfig", "MiningConfig", "PairsConfig"]
