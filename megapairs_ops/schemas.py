"""Every Arrow schema of the pipeline, declared once: the stages write tables of exactly these,
the gates check them (quality/suites.py), the report and the catalogue read them."""

from __future__ import annotations

import pyarrow as pa

_STR = pa.string()
_STRS = pa.list_(pa.string())

# ingest/images.parquet: one row per distinct image (exact copies collapse into duplicate_paths).
IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", _STR),  # sha256[:16]
        ("sha256", _STR),
        ("path", _STR),  # a file path, or "<shard.tar>#<member>"
        ("caption", _STR),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mode", _STR),  # the decoded image's mode before conversion to RGB
        ("phash", pa.int64()),  # 64-bit perceptual hash
        ("file_bytes", pa.int64()),
        ("duplicate_paths", _STRS),
    ]
)

# One ingest work item's usable images, before exact copies across the corpus are collapsed.
INGEST_PART_SCHEMA = pa.schema(
    [(name, IMAGES_SCHEMA.field(name).type) for name in
     ("sha256", "path", "caption", "width", "height", "mode", "phash", "file_bytes")]
)

# embeddings/<encoder>/ids.parquet: row i names the image of vectors.npy row i.
EMBEDDING_IDS_SCHEMA = pa.schema([("image_id", _STR)])

# candidates/<encoder>.parquet and neighbours/<encoder>.parquet.
CANDIDATE_SCHEMA = pa.schema([("q_id", _STR), ("t_id", _STR), ("sim", pa.float32()), ("rank", pa.int32())])

# pairs.parquet: one row per ordered (query, target), the views that found it and its negatives.
PAIRS_SCHEMA = pa.schema(
    [
        ("pair_id", _STR),  # sha256(f"{q_id}:{t_id}")[:16]
        ("q_id", _STR),
        ("t_id", _STR),
        ("encoders", _STRS),
        ("sims", pa.list_(pa.float32())),  # sims[j] found by encoders[j]
        ("max_sim", pa.float32()),
        ("hn_ids", _STRS),
    ]
)

# The contract's columns of annotations.parquet (the catalogue reuses rows of exactly these).
ANNOTATION_SCHEMA = pa.schema(
    [
        ("pair_id", _STR),
        ("description", _STR),
        ("instructions", _STRS),
        ("word_num", pa.int32()),
        ("describe_backend", _STR),
        ("describe_model", _STR),
        ("instruct_backend", _STR),
        ("instruct_model", _STR),
        ("prompt_version", _STR),
        ("attempts", pa.int32()),
    ]
)
# What annotations.parquet holds: the contract's columns, then how each output was sampled.
ANNOTATION_OUTPUT_SCHEMA = pa.schema(
    [
        *ANNOTATION_SCHEMA,
        ("describe_attempts", pa.int32()),
        ("instruct_attempts", pa.int32()),
        ("describe_seed", pa.int64()),
        ("instruct_seed", pa.int64()),
        ("describe_sampling", _STR),
        ("instruct_sampling", _STR),
        ("demo_ids", pa.list_(pa.int32())),
    ]
)

# annotations/records/: every finished (pair, step) outcome, newest per key wins.
ANNOTATION_RECORD_SCHEMA = pa.schema(
    [
        ("pair_id", _STR),
        ("step", _STR),
        ("prompt_version", _STR),
        ("model", _STR),  # the configured model: part of the key
        ("input_digest", _STR),  # what the step was given (instruct: the description)
        ("status", _STR),  # "accepted" | "failed"
        ("text", _STR),  # the model's raw output
        ("instructions", _STRS),
        ("served_model", _STR),  # what the endpoint said it ran
        ("reason", _STR),
        ("detail", _STR),
        ("attempts", pa.int32()),  # tries of this step for this key, all runs together
        ("word_num", pa.int32()),
        ("seed", pa.int64()),
        ("sampling", _STR),  # JSON: temperature, top_p, max_tokens, seed
        ("backend", _STR),
        ("run_id", _STR),
        # Which execution of the stage wrote it: failures of the execution under way are final
        # for it (a resumed task keeps them); failures of a finished one are retried by the next.
        ("execution", _STR),
        # False for a failure that asking again cannot fix (an unreadable image); null in records
        # written before this column existed, which count as retryable.
        ("retryable", pa.bool_()),
        ("created_ns", pa.int64()),
    ]
)

# triplets/part-*.parquet: the released record format, then provenance.
TRIPLET_SCHEMA = pa.schema(
    [
        ("q_img", _STR),
        ("q_text", _STRS),
        ("t_img", _STR),
        ("hns", _STRS),  # hns[0] == q_img, then the hard negatives
        ("pair_id", _STR),
        ("q_id", _STR),
        ("t_id", _STR),
        ("encoders", _STRS),
        ("sims", pa.list_(pa.float32())),
        ("description", _STR),
        ("word_num", pa.int32()),
        ("describe_model", _STR),
        ("instruct_model", _STR),
        ("describe_backend", _STR),
        ("instruct_backend", _STR),
        ("prompt_version", _STR),
        ("run_id", _STR),
    ]
)
RELEASED_FIELDS = ("q_img", "q_text", "t_img", "hns")

# quarantine/<stage>.parquet, quarantine.parquet: inputs that could not be used.
QUARANTINE_SCHEMA = pa.schema([("path", _STR), ("reason", _STR), ("detail", _STR), ("stage", _STR)])

# failures/<stage>.parquet, failures.parquet: pairs that were not published.
FAILURE_SCHEMA = pa.schema(
    [
        ("pair_id", _STR),
        ("q_id", _STR),
        ("t_id", _STR),
        ("stage", _STR),
        ("reason", _STR),
        ("detail", _STR),
        ("attempts", pa.int32()),
    ]
)

# The curators' rejects file (curation.rejects_file), as read.
REJECT_SCHEMA = pa.schema([("kind", _STR), ("id", _STR), ("reason", _STR), ("line", pa.int32())])
