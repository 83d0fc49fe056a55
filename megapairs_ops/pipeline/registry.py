"""The stages, found rather than listed: every sub-package of megapairs_ops.stages declares its
stage (a Stage subclass, pipeline/stage.py), and the run order follows from their upstream
declarations. Adding a stage is adding its package under stages/."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from .stage import Stage


def _declared() -> list[type[Stage]]:
    import megapairs_ops.stages as package

    found = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        # Declarations are light: each stage imports its heavy code inside its methods.
        found += [obj for obj in vars(module).values()
                  if isinstance(obj, type) and issubclass(obj, Stage) and obj.__module__ == module.__name__]
    return found


def run_order(stages: list[Stage]) -> tuple[Stage, ...]:
    """Upstream stages first; stages whose upstreams are all placed keep their name order, so the
    order is the same on every machine."""
    by_name = {s.name: s for s in stages}
    if len(by_name) != len(stages):
        raise ValueError(f"two stages share a name: {sorted(s.name for s in stages)}")
    for stage in stages:
        unknown = [u for u in stage.upstream if u not in by_name]
        if unknown:
            raise ValueError(f"stage '{stage.name}' names unknown upstream stage(s) {unknown}")
    ordered: list[Stage] = []
    placed: set[str] = set()
    while len(ordered) < len(stages):
        ready = sorted(n for n, s in by_name.items() if n not in placed and set(s.upstream) <= placed)
        if not ready:
            raise ValueError(f"stages depend on each other in a cycle: {sorted(set(by_name) - placed)}")
        ordered.append(by_name[ready[0]])
        placed.add(ready[0])
    return tuple(ordered)


@cache
def all_stages() -> tuple[Stage, ...]:
    return run_order([cls() for cls in _declared()])


def stage_names() -> tuple[str, ...]:
    return tuple(s.name for s in all_stages())


def get_stage(name: str) -> Stage:
    for stage in all_stages():
        if stage.name == name:
            return stage
    raise ValueError(f"unknown stage '{name}'; stages are {', '.join(stage_names())}")
