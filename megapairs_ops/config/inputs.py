"""Config of what goes in: the corpus reader (ingest), the similarity views (encoders) and how
they are computed (embed).

Only rules that hold on any machine are checked here. Whether a model folder or a file of
vectors exists on this worker is checked by `environment.py`, for the stages about to run, so a
worker without an unrelated model directory can still run ingest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import Field, field_validator, model_validator

from .base import RUNTIME, Strict

EncoderKind = Literal[
    "classic_color_layout",
    "classic_texture",
    "classic_text_hash",
    "clip_image",
    "clip_text",
    "dinov2",
    "open_clip_image",
    "open_clip_text",
    "precomputed",
]
ENCODER_KINDS = get_args(EncoderKind)
WEIGHT_FREE_KINDS = {"classic_color_layout", "classic_texture", "classic_text_hash"}
TEXT_KINDS = {"classic_text_hash", "clip_text", "open_clip_text"}
OPEN_CLIP_KINDS = {"open_clip_image", "open_clip_text"}
# Kinds whose `image_size` resizes the model input (position embeddings are interpolated).
SIZED_KINDS = {"clip_image", "dinov2", "open_clip_image"}


class ManifestColumns(Strict):
    path: str = "path"
    caption: str = "caption"


class IngestConfig(Strict):
    reader: Literal["auto", "folder", "manifest", "webdataset"] = "auto"
    columns: ManifestColumns = ManifestColumns()
    # Manifest rows may only point inside these roots; empty means "the manifest's own folder".
    allowed_roots: list[str] = []
    max_pixels: Annotated[int, Field(ge=1)] = 100_000_000
    max_file_bytes: Annotated[int, Field(ge=1)] = 64 * 1024 * 1024
    min_side: Annotated[int, Field(ge=1)] = 8
    max_caption_chars: Annotated[int, Field(ge=1)] = 4000
    # Corpus entries (files, manifest rows) per work item; a WebDataset tar is one item whatever
    # its size. A killed ingest resumes at its first unfinished item.
    shard_size: Annotated[int, Field(ge=1, le=10_000_000), RUNTIME] = 512
    # Work items per mapped Airflow task.
    shards_per_task: Annotated[int, Field(ge=1), RUNTIME] = 32


class PrecomputedSource(Strict):
    """Vectors computed elsewhere: clip-retrieval's output folder, or one .npy plus an ids file."""

    # A clip-retrieval output folder (img_emb/, text_emb/, metadata/) or a .npy file of (n, dim).
    path: str
    # With a .npy file: Parquet (column `column`) or .txt (one key per line), row i <-> vector i.
    ids: str | None = None
    # Which clip-retrieval vectors to read: img_emb (image) or text_emb (caption).
    embeddings: Literal["image", "text"] = "image"
    # How a row finds its image in images.parquet: by file path (also matching collapsed
    # duplicate paths), by img2dataset/WebDataset key (file or tar member name without extension),
    # or by this pipeline's image_id / sha256.
    match_on: Literal["path", "key", "image_id", "sha256"] = "path"
    # The column holding the match key; default: image_path (clip-retrieval) for path/key, else match_on.
    column: str | None = None
    # Relative paths in the metadata are taken relative to this folder (clip-retrieval writes them
    # as given on its command line).
    path_root: str | None = None

    @property
    def key_column(self) -> str:
        return self.column or ("image_path" if self.match_on in ("path", "key") else self.match_on)

    @property
    def is_npy(self) -> bool:
        return Path(self.path).suffix == ".npy"

    @model_validator(mode="after")
    def _ids_go_with_npy(self) -> "PrecomputedSource":
        if self.is_npy:
            if not self.ids:
                raise ValueError("a precomputed .npy needs 'ids' (a Parquet or .txt file, one key per vector row)")
            if Path(self.ids).suffix not in (".parquet", ".txt"):
                raise ValueError(f"precomputed ids file '{self.ids}' must be .parquet or .txt")
        elif self.ids:
            raise ValueError("'ids' is only for a plain .npy; clip-retrieval folders carry metadata/")
        return self


class EncoderConfig(Strict):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_\-]{0,63}$")]
    kind: EncoderKind
    model: str | None = None
    revision: str | None = None
    batch_size: Annotated[int, Field(ge=1, le=65536), RUNTIME] = 64
    band: tuple[float, float] = (0.8, 0.96)
    device: Annotated[Literal["auto", "cpu", "cuda"], RUNTIME] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    trust_remote_code: bool = False
    # Only for classic kinds: the vector size; ignored by model-backed kinds. For `precomputed`,
    # when given, the vectors must have this size.
    dim: Annotated[int, Field(ge=8, le=65536)] = 512
    # open_clip kinds: a pretrained tag of the architecture named by `model` (e.g.
    # 'merged2b_s4b_b131k') or a weights file; unused with 'hf-hub:' / 'local-dir:' models.
    pretrained: str | None = None
    # Model input side in pixels; None keeps the checkpoint's own (224 for CLIP/DINOv2).
    image_size: Annotated[int, Field(ge=16, le=4096)] | None = None
    precomputed: PrecomputedSource | None = None

    @field_validator("band")
    @classmethod
    def _band_ordered(cls, band: tuple[float, float]) -> tuple[float, float]:
        lo, hi = band
        if not (-1.0 <= lo < hi <= 1.0):
            raise ValueError(f"band must be [lo, hi] with -1 <= lo < hi <= 1, got [{lo}, {hi}]")
        return band

    @model_validator(mode="after")
    def _kind_takes_these_keys(self) -> "EncoderConfig":
        if self.image_size is not None and self.kind not in SIZED_KINDS:
            raise ValueError(f"image_size applies to kinds {sorted(SIZED_KINDS)}, not '{self.kind}'")
        if self.pretrained is not None and self.kind not in OPEN_CLIP_KINDS:
            raise ValueError(f"'pretrained' is only for open_clip kinds, not '{self.kind}'")
        if (self.kind == "precomputed") != (self.precomputed is not None):
            raise ValueError("kind 'precomputed' needs a 'precomputed' section, and only that kind takes one")
        if self.kind == "precomputed" and self.model:
            raise ValueError("kind 'precomputed' takes no 'model'; its vectors come from 'precomputed.path'")
        if self.kind not in WEIGHT_FREE_KINDS and self.kind != "precomputed" and not self.model:
            raise ValueError(f"encoder kind '{self.kind}' needs 'model' (a hub id or a local directory)")
        return self

    @property
    def modality(self) -> Literal["image", "text"]:
        if self.precomputed is not None:
            return self.precomputed.embeddings
        return "text" if self.kind in TEXT_KINDS else "image"


class EmbedConfig(Strict):
    """How the embed stage runs. Nothing here changes a vector: every key is a runtime knob, so
    changing one re-plans the work and never invalidates finished embeddings."""

    # Images per resumable shard (images.parquet order): one work item; a killed task loses at
    # most one shard.
    shard_size: Annotated[int, Field(ge=1, le=10_000_000), RUNTIME] = 16_384
    # Shards per mapped Airflow task.
    shards_per_task: Annotated[int, Field(ge=1), RUNTIME] = 8
    # Decode + preprocess processes feeding the model: "auto" = one per spare core on CUDA (up to
    # 16); on CPU, where the model already uses every core, decode runs in-process between batches.
    decode_workers: Annotated[int | Literal["auto"], RUNTIME] = "auto"
    # Decoded batches queued per worker ahead of the model.
    prefetch_batches: Annotated[int, Field(ge=1, le=64), RUNTIME] = 2
    # Image encoders of one resource class share a task and decode each image once.
    share_decode: Annotated[bool, RUNTIME] = True
    # Content-addressed embedding cache (image sha256 / caption hash x encoder identity).
    cache: Annotated[bool, RUNTIME] = True
    # Where the cache lives; default: .cache/embeddings beside the run directories, so every run
    # under one output root shares it. A relative path is taken from that output root.
    cache_dir: Annotated[str | None, RUNTIME] = None

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: object) -> object:
        if isinstance(data, dict) and "memory_limit" in data:
            raise ValueError("memory_limit moved to duckdb.memory_limit (one budget for every DuckDB session)")
        return data

    @field_validator("decode_workers")
    @classmethod
    def _workers_count(cls, value: int | str) -> int | str:
        if value != "auto" and not 0 <= value <= 256:
            raise ValueError(f"decode_workers must be 'auto' or 0..256 (0: decode in the task's process), got {value}")
        return value


__all__ = [
    "ENCODER_KINDS", "EmbedConfig", "EncoderConfig", "EncoderKind", "IngestConfig", "ManifestColumns",
    "OPEN_CLIP_KINDS", "PrecomputedSource", "SIZED_KINDS", "TEXT_KINDS", "WEIGHT_FREE_KINDS",
]
