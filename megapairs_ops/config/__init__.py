"""One typed pipeline config (pydantic), loaded from YAML once and validated before any work
starts; every problem is one line naming the key and the fix.

- base.py: strict frozen sections, the RUNTIME marker of knobs that never change a result, and
  `result_view`, what every fingerprint is computed from;
- inputs.py (ingest, encoders, embed), mining.py (mining, pairs, duckdb), annotate.py,
  quality.py (publish, gates, curation, resources): the sections;
- pipeline.py: the whole config, `parse_config` and `load_config`;
- environment.py: what the stages about to run need from this machine (model folders, files).
"""

from .annotate import *  # noqa: F401,F403
from .annotate import __all__ as _annotate
from .base import RUNTIME, ConfigError, MemorySize, Strict, is_runtime, parse_bytes, result_view
from .environment import local_problems
from .inputs import *  # noqa: F401,F403
from .inputs import __all__ as _inputs
from .mining import *  # noqa: F401,F403
from .mining import __all__ as _mining
from .pipeline import PipelineConfig, load_config, parse_config
from .quality import *  # noqa: F401,F403
from .quality import __all__ as _quality

__all__ = [
    *_annotate, *_inputs, *_mining, *_quality,
    "ConfigError", "MemorySize", "PipelineConfig", "RUNTIME", "Strict", "is_runtime", "load_config",
    "local_problems", "parse_bytes", "parse_config", "result_view",
]
