"""Great Expectations gates between stages: the entry point.

A stage declares the suite that guards its output (`Stage.gate`); `validate_stage` builds that
suite's batch (suites.py: the artifact, its helper columns from columns.py, its rules from
rules.py), runs it through a GX checkpoint (gx.py) that refreshes the run's Data Docs, and keeps
the result beside them for the curator report. A failed suite raises `ValidationFailed` (a
permanent GateFailed) with a one-line message, so the Airflow task fails readably and downstream
tasks never start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from megapairs_ops.config import PipelineConfig
from megapairs_ops.layout import RunLayout
from megapairs_ops.storage import read_json, write_json

from .gx import run_checkpoint
from .suites import SUITES, ValidationFailed, suite_name

__all__ = ["SUITES", "ValidationFailed", "gate_results_path", "load_gate_results", "suite_name", "validate_stage"]


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _exception_message(info: dict[str, Any]) -> str | None:
    # GX reports either one exception or one per metric it could not compute.
    infos = [info] if "raised_exception" in info else list(info.values())
    for item in infos:
        if isinstance(item, dict) and item.get("raised_exception"):
            message = str(item.get("exception_message") or "error").splitlines()[0]
            return message.removeprefix("Error: ")[:160]
    return None


def _rule_name(res: Any) -> str:
    return (res.expectation_config.meta or {}).get("rule", res.expectation_config.type)


def _describe_failure(res: Any, schema: dict[str, pa.DataType]) -> str:
    """`rule (what was wrong)`, short enough for one log line."""
    rule = _rule_name(res)
    error = _exception_message(res.exception_info or {})
    if error:
        return f"{rule} (cannot evaluate: {error})"
    r = res.result or {}
    mismatched = (r.get("details") or {}).get("mismatched")
    if mismatched:
        # Helper columns missing only because their inputs are: name the inputs, not them.
        missing = [c for c in mismatched.get("missing") or [] if c in schema]
        extra = mismatched.get("unexpected") or []
        return f"{rule} (missing {missing}, unexpected {extra})"
    if "unexpected_count" in r:
        sample = ", ".join(repr(_plain(v)) for v in (r.get("partial_unexpected_list") or [])[:3])
        return f"{rule} ({r['unexpected_count']} of {r.get('element_count')} rows; e.g. {sample})"
    if "observed_value" in r:
        return f"{rule} (observed {str(r['observed_value'])[:120]})"
    return rule


def validate_stage(
    suite: str, cfg: PipelineConfig, layout: RunLayout, encoder: str | None = None
) -> dict[str, Any]:
    """Validate the artifact `suite` guards (per encoder for "mining"); return a summary or raise
    `ValidationFailed`."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite '{suite}'; expected one of {', '.join(SUITES)}")
    if (suite == "mining") != (encoder is not None):
        raise ValueError("mining validation needs encoder=<name>; other suites take none")
    build, schema = SUITES[suite]
    batch = build(cfg, layout, encoder) if encoder is not None else build(cfg, layout)

    name = suite_name(suite, encoder)
    checkpoint_result, index = run_checkpoint(layout, name, batch)
    (validation,) = checkpoint_result.run_results.values()
    # In suite order, so schema problems come first in the error line.
    order = {rule.name: i for i, rule in enumerate(batch.rules)}
    severity = {rule.name: rule.severity for rule in batch.rules}
    broken = sorted(
        (r for r in validation.results if not r.success),
        key=lambda r: order.get(_rule_name(r), len(order)),
    )
    failed = [r for r in broken if severity.get(_rule_name(r), "fail") == "fail"]
    warned = [r for r in broken if severity.get(_rule_name(r), "fail") == "warn"]
    gates = _gate_outcomes(batch.gates, validation.results)
    by_gate = {g["gate"]: g for g in gates}
    summary = {
        "suite": name,
        "success": not failed,
        "rows": len(batch.df),
        "evaluated": len(validation.results),
        "failed_expectations": [_rule_name(r) for r in failed],
        "warned_expectations": [_rule_name(r) for r in warned],
        "warnings": batch.warnings + [
            f"{suite} gate {_describe_gate(by_gate[_rule_name(r)])}" for r in warned
        ],
        "gates": gates,
        "data_docs": str(index),
    }
    # Kept beside the Data Docs so the curator report shows every gate, passed or not.
    write_json(summary, gate_results_path(layout, name))
    if failed:
        what = "; ".join(
            _describe_gate(by_gate[_rule_name(r)]) if _rule_name(r) in by_gate
            else _describe_failure(r, schema)
            for r in failed
        )
        raise ValidationFailed(
            f"{suite} validation failed (suite {name}, {len(failed)} of "
            f"{summary['evaluated']} expectations): {what}; Data Docs: {index}",
            summary,
        )
    return summary


def gate_results_path(layout: RunLayout, suite: str) -> Path:
    return layout.gate_results_dir / f"{suite}.json"


def load_gate_results(layout: RunLayout) -> list[dict[str, Any]]:
    """Every suite's latest result in this run (as `validate_stage` returned or raised it)."""
    folder = layout.gate_results_dir
    return [read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def _gate_outcomes(gates: list[dict[str, Any]], results: list[Any]) -> list[dict[str, Any]]:
    """Each gate's status from its GX result; GX's observed value wins over ours."""
    by_rule = {_rule_name(r): r for r in results}
    out = []
    for gate in gates:
        gate = dict(gate)
        res = by_rule.get(gate["gate"])
        if res is not None:
            observed = (res.result or {}).get("observed_value")
            if isinstance(observed, (int, float, np.number)) and not isinstance(observed, bool):
                gate["observed"] = float(observed)
            gate["status"] = "pass" if res.success else gate["severity"]
        elif gate["status"] == "pending":
            gate["status"] = "skipped"
        out.append(gate)
    return out


def _describe_gate(gate: dict[str, Any]) -> str:
    """`instruction_share (observed 1 > max 0.2: 'Find ...' in 40 of 40 triplets)`."""
    observed = gate.get("observed")
    shown = "n/a" if observed is None else f"{observed:.3g}"
    sign = ">" if gate["bound"] == "max" else "<"
    detail = f": {gate['detail']}" if gate.get("detail") else ""
    return f"{gate['gate']} (observed {shown} {sign} {gate['bound']} {gate['threshold']}{detail})"
