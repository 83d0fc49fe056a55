"""What a config needs from the machine it runs on: model folders, files of vectors, the rejects
file. Checked for the stages about to run (preflight.py: `check-config`, `run`, and each task
for its own stage), never when a config is loaded, so a worker without an unrelated model
directory can still run ingest."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .base import looks_like_local_path
from .inputs import OPEN_CLIP_KINDS, WEIGHT_FREE_KINDS, EncoderConfig, PrecomputedSource
from .pipeline import PipelineConfig


def local_problems(cfg: PipelineConfig, stages: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """(config key, problem) for every path the given stages (all when None) need and miss."""
    wanted = set(stages) if stages is not None else None
    problems: list[tuple[str, str]] = []
    if wanted is None or "embed" in wanted:
        for i, enc in enumerate(cfg.encoders):
            problems += [(f"encoders.{i}.{key}", why) for key, why in _encoder_problems(enc)]
    if wanted is None or "annotate" in wanted:
        for name in ("describe", "instruct"):
            step = getattr(cfg.annotate, name)
            if step.backend in ("transformers", "vllm") and step.model and looks_like_local_path(step.model):
                if not (Path(step.model).expanduser() / "config.json").is_file():
                    problems.append((f"annotate.{name}.model", f"model path '{step.model}' has no config.json"))
    if wanted is None or "publish" in wanted:
        rejects = cfg.curation.rejects_file
        if rejects is not None and not Path(rejects).expanduser().is_file():
            problems.append(("curation.rejects_file",
                             f"file '{rejects}' not found; create it (CSV header: kind,id,reason) or set null"))
    return problems


def _encoder_problems(enc: EncoderConfig) -> list[tuple[str, str]]:
    if enc.kind in WEIGHT_FREE_KINDS:
        return []
    if enc.precomputed is not None:
        return [(f"precomputed.{k}", why) for k, why in _precomputed_problems(enc.precomputed)]
    model = enc.model or ""
    if enc.kind in OPEN_CLIP_KINDS:
        if model.startswith("local-dir:") or looks_like_local_path(model):
            folder = Path(model.removeprefix("local-dir:")).expanduser()
            if not (folder / "open_clip_config.json").is_file():
                return [("model", f"open_clip model folder '{folder}' has no open_clip_config.json; give an "
                                  "architecture name (e.g. EVA02-L-14) with 'pretrained', 'hf-hub:org/repo' or a "
                                  "local-dir: folder")]
        elif enc.pretrained and looks_like_local_path(enc.pretrained):
            if not Path(enc.pretrained).expanduser().is_file():
                return [("pretrained", f"pretrained weights file '{enc.pretrained}' not found")]
        return []
    if looks_like_local_path(model) and not (Path(model).expanduser() / "config.json").is_file():
        return [("model", f"model path '{model}' has no config.json; point 'model' at a directory written by "
                          "save_pretrained()")]
    return []


def _precomputed_problems(src: PrecomputedSource) -> list[tuple[str, str]]:
    root = Path(src.path).expanduser()
    if src.is_npy:
        if not root.is_file():
            return [("path", f"precomputed vectors file '{src.path}' not found")]
        if src.ids and not Path(src.ids).expanduser().is_file():
            return [("ids", f"precomputed ids file '{src.ids}' not found")]
        return []
    folder = "img_emb" if src.embeddings == "image" else "text_emb"
    if root.is_file():
        return [("path", f"precomputed path '{src.path}' must be a .npy file or a clip-retrieval folder")]
    if not (root / folder).is_dir() or not (root / "metadata").is_dir():
        return [("path", f"precomputed path '{src.path}' is neither a .npy file nor a clip-retrieval folder "
                         f"with {folder}/ and metadata/")]
    return []
