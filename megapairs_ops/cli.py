"""`megapairs` command line: the same stage functions the Airflow DAG calls, run in-process."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from megapairs_ops.config import ConfigError, load_config
from megapairs_ops.preflight import preflight, raise_on_fatal


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="pipeline config YAML (e.g. configs/demo.yaml)")
    p.add_argument("--corpus", required=True, help="image folder, manifest file or WebDataset tar(s)")
    p.add_argument("--out", required=True, help="run directory for every output of this run")
    p.add_argument("--run-id", default=None, help="recorded in every triplet (default: the run folder name)")
    p.add_argument("--force", action="store_true", help="redo stages even when finished")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for CPU-bound work items (ingest, CPU embedding); default: every core")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megapairs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample-corpus", help="write the deterministic synthetic sample corpus")
    p.add_argument("dir")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("run", help="run the pipeline stages in-process")
    _add_run_args(p)
    p.add_argument("--until", default=None, help="last stage to run (ingest, embed, mine, pairs, annotate, publish)")

    p = sub.add_parser("stage", help="run one stage (for one encoder where the stage is per encoder)")
    _add_run_args(p)
    p.add_argument("stage")
    p.add_argument("--encoder", default=None)

    p = sub.add_parser(
        "check-config",
        help="validate a config file (and the environment variables and endpoints it names) and print it resolved",
    )
    p.add_argument("config")

    p = sub.add_parser("airflow-pools", help="create or update the Airflow pools a profile routes tasks to")
    p.add_argument("--config", required=True)

    p = sub.add_parser("summary", help="print where a run's outputs are; non-zero if the run is incomplete")
    p.add_argument("run_dir")

    p = sub.add_parser("report", help="(re)build a run's curator report, RUN_DIR/reports/index.html")
    p.add_argument("run_dir")
    p.add_argument("--config", default=None, help="default: the config the run recorded at publish")
    p.add_argument("--previous", default=None, help="run directory to compare with (default: curation.compare_with)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"megapairs: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megapairs: interrupted; finished stages and shards are kept, re-run to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # one readable line for the user; the traceback is in --debug logs
        logging.getLogger("megapairs").debug("failure", exc_info=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"megapairs: error: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    from megapairs_ops import pipeline

    if args.command == "sample-corpus":
        from megapairs_ops.sample_corpus import generate_sample_corpus

        stats = generate_sample_corpus(Path(args.dir), n=args.n, seed=args.seed)
        print(json.dumps(stats, default=str))
        return 0
    if args.command == "check-config":
        cfg = load_config(args.config)
        raise_on_fatal(preflight(cfg), args.config)
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    if args.command == "summary":
        return _summary(Path(args.run_dir))
    if args.command == "airflow-pools":
        return _airflow_pools(load_config(args.config))
    if args.command == "report":
        from megapairs_ops.layout import RunLayout
        from megapairs_ops.report import build_report, load_run_config

        layout = RunLayout(Path(args.run_dir))
        cfg = load_config(args.config) if args.config else load_run_config(layout)
        previous = RunLayout(Path(args.previous)) if args.previous else None
        print(json.dumps(build_report(cfg, layout, previous=previous), default=str))
        return 0

    ctx = pipeline.context_from_params(
        args.config, args.corpus, args.out, run_id=args.run_id, progress=sys.stderr.isatty()
    )
    if not ctx.corpus.exists():
        raise FileNotFoundError(f"corpus {ctx.corpus} does not exist")
    if args.command == "stage":
        pipeline.check_before_run(ctx, stages=[args.stage])
    else:
        pipeline.check_before_run(ctx, until=args.until)
    if args.command == "run":
        pipeline.run_pipeline(ctx, until=args.until, force=args.force, workers=_workers(args))
        if args.until in (None, "publish"):
            return _summary(ctx.layout.root)
        return 0
    if args.command == "stage":
        record = pipeline.run_stage(ctx, args.stage, args.encoder, force=args.force, workers=_workers(args))
        print(json.dumps(record, default=str))
        return 0
    raise AssertionError(args.command)


def _workers(args: argparse.Namespace) -> int:
    from .pipeline.executor import default_workers

    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers: must be at least 1, got {args.workers}")
    return args.workers or default_workers()


def _airflow_pools(cfg) -> int:
    import shutil
    import subprocess

    from megapairs_ops.deployment import pool_specs

    airflow = shutil.which("airflow") or str(Path(sys.executable).with_name("airflow"))
    for name, slots, description in pool_specs(cfg.resources):
        subprocess.run([airflow, "pools", "set", name, str(slots), description], check=True)
        print(f"pool {name}: {slots} slots")
    return 0


def _summary(run_dir: Path) -> int:
    from megapairs_ops.layout import RunLayout
    from megapairs_ops.pipeline import output_locations
    from megapairs_ops.storage import read_json

    layout = RunLayout(run_dir)
    if not layout.stats.is_file():
        print(f"megapairs: error: {layout.stats} not found; is {run_dir} a run directory?", file=sys.stderr)
        return 1
    stats = read_json(layout.stats)
    print(f"run {stats.get('run_id')} in {layout.root}")
    for key, record in stats.get("stages", {}).items():
        print(f"  {key:<24} {str(record.get('rows_in')):>8} in  {str(record.get('rows_out')):>8} out  {record.get('seconds', 0):>8.1f}s")
    for name, path in output_locations(layout).items():
        print(f"  {name:<15} {path}")
    if not stats.get("complete"):
        print("megapairs: error: run is incomplete (no publish stage recorded)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
