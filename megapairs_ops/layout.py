"""Every path of a run, named once. Stages, gates, the report and the CLI ask `RunLayout` where a
thing lives; none of them joins paths onto `root` by hand.

A run directory (one partition of an output root):

    ingest/images.parquet                the usable images, one row per distinct image
    embeddings/<encoder>/                vectors.npy + ids.parquet per view
    candidates/<encoder>.parquet         in-band (query, target) of one view
    neighbours/<encoder>.parquet (.json) retrieved sets, kept for hard negatives and reuse
    pairs.parquet                        the union over views, with hard negatives
    annotations.parquet                  accepted descriptions and instructions
    triplets/part-*.parquet, triplets.jsonl, manifest.json   the published dataset version
    quarantine/<stage>.parquet, failures/<stage>.parquet      per stage, merged at publish
    reports/                             stats.json, the curator report, Data Docs
    work/<stage key>/                    a running stage's plan and committed work items
    _status/<stage key>.json             a finished stage's record
    tmp/<stage>/                         DuckDB spill files
    gx/                                  the Great Expectations project

Beside the run directories, under the output root: catalogue.duckdb (published pairs and
versions) and .cache/embeddings/ (vectors by content), shared by every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """Where every artifact of one run lives. Paths only; creating them is the stages' job."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    @property
    def version(self) -> str:
        """The dataset version a publication of this run becomes: the partition's name."""
        return self.root.name

    @property
    def output_root(self) -> Path:
        return self.root.parent

    # -- what runs share under the output root --------------------------------------------------
    @property
    def default_catalogue(self) -> Path:
        return self.output_root / "catalogue.duckdb"

    @property
    def default_embedding_cache(self) -> Path:
        return self.output_root / ".cache" / "embeddings"

    # -- ingest ----------------------------------------------------------------------------------
    @property
    def images(self) -> Path:
        return self.root / "ingest" / "images.parquet"

    # -- embed: vectors.npy (float32, L2-normalised, row i <-> ids.parquet row i) -----------------
    def embedding_dir(self, encoder: str) -> Path:
        return self.root / "embeddings" / encoder

    def embedding_vectors(self, encoder: str) -> Path:
        return self.embedding_dir(encoder) / "vectors.npy"

    def embedding_ids(self, encoder: str) -> Path:
        return self.embedding_dir(encoder) / "ids.parquet"

    # -- mine ------------------------------------------------------------------------------------
    @property
    def candidates_dir(self) -> Path:
        return self.root / "candidates"

    def candidates(self, encoder: str) -> Path:
        return self.candidates_dir / f"{encoder}.parquet"

    def neighbours(self, encoder: str) -> Path:
        return self.root / "neighbours" / f"{encoder}.parquet"

    def neighbours_meta(self, encoder: str) -> Path:
        """What incremental mining of a later run needs to know about these neighbours."""
        return self.root / "neighbours" / f"{encoder}.json"

    # -- pairs, annotate -------------------------------------------------------------------------
    @property
    def pairs(self) -> Path:
        return self.root / "pairs.parquet"

    @property
    def annotations(self) -> Path:
        """Accepted annotations, one row per pair."""
        return self.root / "annotations.parquet"

    @property
    def annotation_records(self) -> Path:
        """Per-record checkpoints of every answer, kept across executions (annotate/records.py)."""
        return self.root / "annotations" / "records"

    @property
    def request_images(self) -> Path:
        """Resized images handed to an endpoint by file URL (image_transport: file)."""
        return self.root / "annotations" / "request_images"

    # -- publish ---------------------------------------------------------------------------------
    @property
    def triplets_dir(self) -> Path:
        return self.root / "triplets"

    @property
    def triplets_rejected(self) -> Path:
        """A triplet set that failed its gate, moved aside so it never looks published."""
        return self.root / "triplets.rejected"

    @property
    def triplets_jsonl(self) -> Path:
        return self.root / "triplets.jsonl"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    # -- problems: each stage writes its own part, merged at publish -------------------------------
    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    def quarantine_part(self, stage: str) -> Path:
        return self.quarantine_dir / f"{stage}.parquet"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine.parquet"

    @property
    def failures_dir(self) -> Path:
        return self.root / "failures"

    def failures_part(self, stage: str) -> Path:
        return self.failures_dir / f"{stage}.parquet"

    @property
    def failures(self) -> Path:
        return self.root / "failures.parquet"

    # -- reports ---------------------------------------------------------------------------------
    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def stats(self) -> Path:
        return self.reports_dir / "stats.json"

    @property
    def run_config(self) -> Path:
        """The resolved config of the run's last publish (`megapairs report` needs no --config)."""
        return self.reports_dir / "run_config.json"

    @property
    def report_index(self) -> Path:
        return self.reports_dir / "index.html"

    @property
    def report_summary(self) -> Path:
        """The report's headline figures, which a later run's report compares with."""
        return self.reports_dir / "summary.json"

    @property
    def thumbs_dir(self) -> Path:
        return self.reports_dir / "thumbs"

    @property
    def data_docs_dir(self) -> Path:
        return self.reports_dir / "data_docs"

    @property
    def gate_results_dir(self) -> Path:
        return self.reports_dir / "gates"

    @property
    def gx_dir(self) -> Path:
        return self.root / "gx"

    # -- the machinery ---------------------------------------------------------------------------
    def work_dir(self, stage_key: str) -> Path:
        """A stage's plan and committed work items while it runs (storage.WorkDir)."""
        return self.root / "work" / stage_key

    def spill_dir(self, stage: str) -> Path:
        """DuckDB's spill folder of one stage; emptied when the stage starts."""
        return self.root / "tmp" / stage

    @property
    def status_dir(self) -> Path:
        return self.root / "_status"

    def status(self, stage_key: str) -> Path:
        return self.status_dir / f"{stage_key}.json"
