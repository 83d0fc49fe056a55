"""What every stage of one run is given: the config, the corpus, the run directory, the run id."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megapairs_ops.config import PipelineConfig, load_config, parse_config
from megapairs_ops.layout import RunLayout


@dataclass
class RunContext:
    cfg: PipelineConfig
    corpus: Path
    layout: RunLayout
    run_id: str
    progress: bool = False
    config_source: str = "<config>"  # the config file, named in error lines
    _corpus_sig: str | None = field(default=None, repr=False)

    def corpus_signature(self) -> str:
        if self._corpus_sig is None:
            self._corpus_sig = corpus_signature(self.corpus)
        return self._corpus_sig

    def params(self) -> dict[str, Any]:
        """What a worker process needs to rebuild this context (JSON-able)."""
        return {"config": self.cfg.model_dump(mode="json"), "corpus": str(self.corpus), "out": str(self.layout.root),
                "run_id": self.run_id, "config_source": self.config_source}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "RunContext":
        cfg = parse_config(params["config"], params.get("config_source", "<config>"))
        return cls(cfg, Path(params["corpus"]), RunLayout(Path(params["out"])), params["run_id"],
                   config_source=params.get("config_source", "<config>"))


def context_from_params(
    config: str | os.PathLike,
    corpus: str | os.PathLike,
    out: str | os.PathLike,
    run_id: str | None = None,
    progress: bool = False,
) -> RunContext:
    cfg = load_config(config)
    layout = RunLayout(Path(out))
    return RunContext(
        cfg=cfg,
        corpus=Path(corpus).expanduser().resolve(),
        layout=layout,
        run_id=run_id or layout.root.name,
        progress=progress,
        config_source=str(config),
    )


def corpus_signature(path: Path) -> str:
    """Cheap change detector for the corpus: names, sizes and mtimes, not contents."""
    h = hashlib.sha256(str(path).encode())
    if path.is_file():
        st = path.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    elif path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = Path(root, name)
                try:
                    st = full.stat()
                except OSError:
                    continue
                h.update(f"{full.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]
