"""Stage gates: each artifact passes its suite when well-formed, and each broken rule fails the
suite with a one-line ValidationFailed naming that rule."""

from __future__ import annotations

import hashlib
import multiprocessing
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest

from megapairs_ops.config import ConfigError, parse_config
from megapairs_ops.layout import RunLayout
from megapairs_ops.quality.gates import ValidationFailed, load_gate_results, validate_stage
from megapairs_ops.quality.suites import CANDIDATES_SCHEMA, IMAGES_SCHEMA, PAIRS_SCHEMA, TRIPLETS_SCHEMA
from megapairs_ops.storage import write_parquet

N_IMAGES = 12


@pytest.fixture(scope="module")
def cfg():
    return parse_config(
        {
            "encoders": [
                {"name": "sem", "kind": "classic_color_layout"},
                {"name": "cap", "kind": "classic_text_hash", "band": [0.5, 0.9]},
            ]
        }
    )


@pytest.fixture
def layout(tmp_path):
    return RunLayout(tmp_path / "run")


def _sha(i: int) -> str:
    return hashlib.sha256(f"image-{i}".encode()).hexdigest()


def _id(i: int) -> str:
    return _sha(i)[:16]


def _pair_id(q: str, t: str) -> str:
    return hashlib.sha256(f"{q}:{t}".encode()).hexdigest()[:16]


def _table(rows: list[dict], schema: dict) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=pa.schema(list(schema.items())))


def image_rows() -> list[dict]:
    rows = [
        {
            "image_id": _id(i),
            "sha256": _sha(i),
            "path": f"/data/img/{i}.jpg",
            "caption": f"a photo number {i}",
            "width": 64,
            "height": 48,
            "mode": "RGB",
            "phash": -(i * 7919),
            "file_bytes": 1000 + i,
            "duplicate_paths": [] if i else ["/data/img/copy.jpg"],
        }
        for i in range(N_IMAGES)
    ]
    return sorted(rows, key=lambda r: r["image_id"])


def candidate_rows() -> list[dict]:
    return [
        {"q_id": _id(q), "t_id": _id(q + d), "sim": 0.9 - 0.01 * d, "rank": d}
        for q in range(4)
        for d in (1, 2, 3)
    ]


def _hns(q: int, t: int) -> list[int]:
    return [i for i in range(N_IMAGES) if i not in (q, t)][:5]


def pair_rows() -> list[dict]:
    rows = []
    for q, t in [(0, 1), (0, 2), (3, 4), (5, 6)]:
        rows.append(
            {
                "pair_id": _pair_id(_id(q), _id(t)),
                "q_id": _id(q),
                "t_id": _id(t),
                "encoders": ["cap", "sem"],
                "sims": [0.7, 0.85],
                "max_sim": 0.85,
                "hn_ids": [_id(i) for i in _hns(q, t)],
            }
        )
    return rows


def triplet_rows() -> list[dict]:
    rows = []
    for p in pair_rows():
        q, t = p["q_id"], p["t_id"]
        rows.append(
            {
                "q_img": f"/data/img/{q}.jpg",
                "q_text": [f"Find a {w} scene like this." for w in ("red", "wide", "calm")],
                "t_img": f"/data/img/{t}.jpg",
                "hns": [f"/data/img/{q}.jpg"] + [f"/data/img/{h}.jpg" for h in p["hn_ids"]],
                "pair_id": p["pair_id"],
                "q_id": q,
                "t_id": t,
                "encoders": p["encoders"],
                "sims": p["sims"],
                "description": " ".join(["Both show the same quiet street, and the second one is at night."] * 6),
                "word_num": 72,
                "describe_model": "template",
                "instruct_model": "template",
                "describe_backend": "template",
                "instruct_backend": "template",
                "prompt_version": "v1",
                "run_id": "run-1",
            }
        )
    return rows


def write_ingest(layout, rows):
    write_parquet(_table(rows, IMAGES_SCHEMA), layout.images)


def write_mining(layout, rows, encoder="sem"):
    write_parquet(_table(rows, CANDIDATES_SCHEMA), layout.candidates(encoder))


def write_pairs(layout, rows):
    write_parquet(_table(rows, PAIRS_SCHEMA), layout.pairs)


def write_triplets(layout, rows, parts=2):
    layout.triplets_dir.mkdir(parents=True, exist_ok=True)
    step = max(1, -(-len(rows) // parts))
    for k in range(0, len(rows), step):
        path = layout.triplets_dir / f"part-{k // step:05d}.parquet"
        write_parquet(_table(rows[k : k + step], TRIPLETS_SCHEMA), path)


WRITERS = {
    "ingest": (image_rows, write_ingest),
    "mining": (candidate_rows, write_mining),
    "pairs": (pair_rows, write_pairs),
    "triplets": (triplet_rows, write_triplets),
}


def run(stage, cfg, layout):
    return validate_stage(stage, cfg, layout, encoder="sem" if stage == "mining" else None)


def test_damaged_text_gate_names_the_check_that_failed(cfg, layout):
    rows = triplet_rows()
    rows[0]["description"] += " <|im_end|> {{{"
    write_triplets(layout, rows)
    with pytest.raises(ValidationFailed, match=r"text_passes_output_checks \(1 of 4 rows; e.g. 'template_token'\)"):
        run("triplets", cfg, layout)


@pytest.mark.parametrize("stage", list(WRITERS))
def test_well_formed_artifact_passes(stage, cfg, layout):
    rows, write = WRITERS[stage]
    write(layout, rows())
    result = run(stage, cfg, layout)
    suffix = "_sem" if stage == "mining" else ""
    assert result["suite"] == f"megapairs_{stage}{suffix}"
    assert result["success"] is True
    assert result["failed_expectations"] == []
    assert result["evaluated"] >= 10
    assert result["warnings"] == []
    index = Path(result["data_docs"])
    assert index == layout.data_docs_dir / "index.html"
    assert result["suite"] in index.read_text()


def _set(i, **values):
    def mutate(rows):
        rows[i].update(values)
        return rows

    return mutate


def _dup(i, j, *keys):
    def mutate(rows):
        rows[j].update({k: rows[i][k] for k in keys})
        return rows

    return mutate


def _fn(f):
    def mutate(rows):
        f(rows)
        return rows

    return mutate


VIOLATIONS = [
    # ingest
    ("ingest", _set(0, image_id=None), "image_id_not_null"),
    ("ingest", _dup(0, 1, "image_id"), "image_id_unique"),
    ("ingest", _set(0, image_id="XYZ"), "image_id_16_hex"),
    ("ingest", _set(0, sha256="abc"), "sha256_64_hex"),
    ("ingest", _set(0, image_id=_id(99)), "image_id_is_sha256_prefix"),
    ("ingest", _set(0, path=None), "path_not_null"),
    ("ingest", _set(0, caption="   "), "caption_not_blank"),
    ("ingest", _set(0, width=4), "width_min_side"),
    ("ingest", _set(0, height=7), "height_min_side"),
    # mining
    ("mining", _set(0, t_id=None), "t_id_not_null"),
    ("mining", _set(0, q_id=None), "q_id_not_null"),
    ("mining", _fn(lambda r: r[0].update(t_id=r[0]["q_id"])), "q_ne_t"),
    ("mining", _set(0, sim=0.97), "sim_in_band"),
    ("mining", _set(0, sim=0.5), "sim_in_band"),
    ("mining", _set(0, rank=0), "rank_positive"),
    ("mining", _fn(lambda r: r.extend(
        {"q_id": _id(0), "t_id": _id(k), "sim": 0.85, "rank": k} for k in range(4, 7))),
     "max_targets_per_query"),
    ("mining", _fn(lambda r: r.append(dict(r[0], rank=9))), "q_t_unique"),
    # pairs
    ("pairs", _dup(0, 1, "pair_id"), "pair_id_unique"),
    ("pairs", _set(0, pair_id="0" * 16), "pair_id_from_ids"),
    ("pairs", _fn(lambda r: r.append(dict(r[0], pair_id="f" * 16))), "q_t_unique"),
    ("pairs", _fn(lambda r: r[0].update(t_id=r[0]["q_id"],
                                         pair_id=_pair_id(r[0]["q_id"], r[0]["q_id"]))), "q_ne_t"),
    ("pairs", _fn(lambda r: r[0]["hn_ids"].pop()), "hn_count"),
    ("pairs", _fn(lambda r: r[0]["hn_ids"].__setitem__(2, r[0]["t_id"])), "t_not_in_hns"),
    ("pairs", _fn(lambda r: r[0]["hn_ids"].__setitem__(0, r[0]["q_id"])), "q_not_in_hns"),
    ("pairs", _set(0, encoders=[], sims=[]), "encoders_non_empty"),
    # 0.92 is inside the sem band but outside the cap band: bands are per encoder
    ("pairs", _set(0, sims=[0.92, 0.85]), "sims_in_band"),
    ("pairs", _set(0, encoders=["cap", "other"]), "sims_in_band"),
    ("pairs", _set(0, sims=[0.7]), "sims_in_band"),
    # triplets
    ("triplets", _fn(lambda r: r[0].update(t_img=r[0]["q_img"])), "q_ne_t_img"),
    ("triplets", _fn(lambda r: r[0]["hns"].reverse()), "hns0_is_q_img"),
    ("triplets", _fn(lambda r: r[0]["hns"].__setitem__(3, r[0]["t_img"])), "t_img_not_in_hns"),
    ("triplets", _fn(lambda r: r[0]["q_text"].pop()), "min_instructions"),
    ("triplets", _fn(lambda r: r[0]["q_text"].__setitem__(2, r[0]["q_text"][0] + " ")),
     "min_distinct_instructions"),
    ("triplets", _fn(lambda r: r[0]["q_text"].append("  ")), "no_blank_instructions"),
    ("triplets", _fn(lambda r: r[0]["hns"].pop()), "hns_count"),
    ("triplets", _set(0, sims=[0.95, 0.85]), "sims_in_band"),
    ("triplets", _fn(lambda r: r[1].update(q_img=r[0]["q_img"], t_img=r[0]["t_img"],
                                            hns=list(r[0]["hns"]))), "q_t_img_unique"),
    ("triplets", _dup(0, 1, "pair_id"), "pair_id_unique"),
    ("triplets", _set(0, run_id=None), "run_id_not_null"),
    ("triplets", _set(0, prompt_version=None), "prompt_version_not_null"),
    ("triplets", _set(0, word_num=5), "word_num_in_range"),
    # damaged model text that got past annotate would still not publish
    ("triplets", _fn(lambda r: r[0].update(description=r[0]["description"] + " <|im_end|> {{{")),
     "text_passes_output_checks"),
    ("triplets", _fn(lambda r: r[0]["q_text"].__setitem__(1, "Find Image 2 but at night.")),
     "text_passes_output_checks"),
    ("triplets", _fn(lambda r: r[0]["q_text"].__setitem__(2, "Find the same street but with a")),
     "text_passes_output_checks"),
]


@pytest.mark.parametrize(
    "stage,mutate,rule", VIOLATIONS, ids=[f"{s}-{r}-{i}" for i, (s, _, r) in enumerate(VIOLATIONS)]
)
def test_each_broken_rule_fails_with_its_name(stage, mutate, rule, cfg, layout):
    rows, write = WRITERS[stage]
    write(layout, mutate(rows()))
    with pytest.raises(ValidationFailed) as err:
        run(stage, cfg, layout)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{stage} validation failed")
    assert rule in err.value.result["failed_expectations"]
    assert rule in message
    assert str(layout.data_docs_dir / "index.html") in message
    # executors pickle task exceptions; the result must survive
    assert pickle.loads(pickle.dumps(err.value)).result == err.value.result


def test_band_bounds_are_strict_and_per_encoder(cfg, layout):
    # cap's band is (0.5, 0.9); 0.5 is exact in float32, so this is a value on the bound
    write_mining(layout, [dict(candidate_rows()[0], sim=0.5)], encoder="cap")
    with pytest.raises(ValidationFailed, match="sim_in_band"):
        validate_stage("mining", cfg, layout, encoder="cap")
    write_mining(layout, [dict(candidate_rows()[0], sim=0.93)], encoder="sem")
    assert validate_stage("mining", cfg, layout, encoder="sem")["success"]
    write_mining(layout, [dict(candidate_rows()[0], sim=0.93)], encoder="cap")
    with pytest.raises(ValidationFailed, match="sim_in_band"):
        validate_stage("mining", cfg, layout, encoder="cap")


def test_wrong_types_and_missing_columns_fail_on_schema_rules(cfg, layout):
    table = _table(image_rows(), IMAGES_SCHEMA)
    table = table.set_column(
        table.schema.get_field_index("width"), "width", table["width"].cast(pa.int64())
    ).drop_columns(["mode"])
    write_parquet(table, layout.images)
    with pytest.raises(ValidationFailed) as err:
        run("ingest", cfg, layout)
    failed = err.value.result["failed_expectations"]
    assert {"width_type", "columns_present", "mode_type"} <= set(failed)


def test_list_column_with_wrong_item_type_fails(cfg, layout):
    schema = dict(TRIPLETS_SCHEMA, sims=pa.list_(pa.float64()))
    layout.triplets_dir.mkdir(parents=True)
    write_parquet(_table(triplet_rows(), schema), layout.triplets_dir / "part-00000.parquet")
    with pytest.raises(ValidationFailed) as err:
        run("triplets", cfg, layout)
    assert err.value.result["failed_expectations"] == ["sims_type"]


def test_extra_column_in_released_triplets_fails(cfg, layout):
    rows = [dict(r, secret="x") for r in triplet_rows()]
    layout.triplets_dir.mkdir(parents=True)
    table = pa.Table.from_pylist(rows, schema=pa.schema(
        list(TRIPLETS_SCHEMA.items()) + [("secret", pa.string())]))
    write_parquet(table, layout.triplets_dir / "part-00000.parquet")
    with pytest.raises(ValidationFailed, match="columns_match"):
        run("triplets", cfg, layout)


def test_ingest_with_no_images_fails(cfg, layout):
    write_ingest(layout, [])
    with pytest.raises(ValidationFailed, match="has_usable_images") as err:
        run("ingest", cfg, layout)
    assert err.value.result["failed_expectations"] == ["has_usable_images"]


@pytest.mark.parametrize("stage", ["mining", "pairs"])
def test_empty_mining_or_pairs_passes_with_a_warning(stage, cfg, layout):
    WRITERS[stage][1](layout, [])
    result = run(stage, cfg, layout)
    assert result["success"] is True
    assert result["rows"] == 0
    assert len(result["warnings"]) == 1


def test_triplets_without_parts_fail_as_nothing_to_publish(cfg, layout):
    with pytest.raises(ValidationFailed, match="has_triplets"):
        run("triplets", cfg, layout)
    write_triplets(layout, [])
    with pytest.raises(ValidationFailed, match="has_triplets"):
        run("triplets", cfg, layout)


def test_triplet_parts_are_read_together(cfg, layout):
    rows = triplet_rows()
    write_triplets(layout, rows, parts=4)
    (layout.triplets_dir / ".part-00009.parquet.tmp").write_bytes(b"half-written")
    assert run("triplets", cfg, layout)["rows"] == len(rows)
    # a duplicate pair split across two parts is still a duplicate
    write_triplets(layout, rows + [dict(rows[0])], parts=2)
    with pytest.raises(ValidationFailed, match="pair_id_unique"):
        run("triplets", cfg, layout)


def test_triplet_parts_with_incompatible_schemas_fail_readably(cfg, layout):
    rows = triplet_rows()
    write_triplets(layout, rows[:2], parts=1)
    bad = _table(rows[2:], TRIPLETS_SCHEMA)
    # word_num as list<string> cannot be promoted to int32
    bad = bad.set_column(bad.schema.get_field_index("word_num"), "word_num",
                         pa.array([["x"]] * bad.num_rows))
    write_parquet(bad, layout.triplets_dir / "part-00001.parquet")
    with pytest.raises(ValidationFailed, match="part-00001.parquet") as err:
        run("triplets", cfg, layout)
    assert "\n" not in str(err.value)


def test_missing_artifact_is_reported_not_validated(cfg, layout):
    with pytest.raises(FileNotFoundError, match="pairs output"):
        run("pairs", cfg, layout)


def test_importing_the_module_stays_light():
    code = ("import sys, megapairs_ops.quality.gates; "
            "print(sorted(m for m in ('great_expectations', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_arguments(cfg, layout):
    with pytest.raises(ValueError, match="unknown suite"):
        validate_stage("embed", cfg, layout)
    with pytest.raises(ValueError, match="encoder"):
        validate_stage("mining", cfg, layout)
    write_mining(layout, candidate_rows(), encoder="nope")
    with pytest.raises(KeyError, match="no encoder named 'nope'"):
        validate_stage("mining", cfg, layout, encoder="nope")


def test_rerun_and_docs_accumulate_across_stages(cfg, layout):
    for stage, (rows, write) in WRITERS.items():
        write(layout, rows())
    for _ in range(2):
        for stage in WRITERS:
            assert run(stage, cfg, layout)["success"]
    write_mining(layout, candidate_rows(), encoder="cap")
    assert validate_stage("mining", cfg, layout, encoder="cap")["success"]
    index = (layout.data_docs_dir / "index.html").read_text()
    for suite in ("megapairs_ingest", "megapairs_mining_sem", "megapairs_mining_cap",
                  "megapairs_pairs", "megapairs_triplets"):
        assert suite in index
    # the run is recorded under the run directory's name
    assert layout.root.name in index
    # no project id in the docs' asset URLs, analytics off in the project config
    assert "dataContextId" not in index
    project = (layout.gx_dir / "gx" / "great_expectations.yml").read_text()
    assert "analytics_enabled: false" in project
    validations = list((layout.gx_dir / "gx" / "uncommitted" / "validations").rglob("*.json"))
    assert len(validations) == 2 * len(WRITERS) + 1


def test_a_failure_then_a_fix_in_the_same_layout(cfg, layout):
    rows = pair_rows()
    rows[0]["hn_ids"].pop()
    write_pairs(layout, rows)
    with pytest.raises(ValidationFailed):
        run("pairs", cfg, layout)
    write_pairs(layout, pair_rows())
    assert run("pairs", cfg, layout)["success"]


def test_concurrent_threads_share_one_project(cfg, layout):
    for enc in ("sem", "cap"):
        write_mining(layout, candidate_rows(), encoder=enc)
    write_pairs(layout, pair_rows())
    jobs = [("mining", "sem"), ("mining", "cap"), ("pairs", None)] * 2
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda j: validate_stage(j[0], cfg, layout, encoder=j[1]), jobs))
    assert all(r["success"] for r in results)


def _validate_in_child(root: str, encoder: str, queue) -> None:
    cfg = parse_config({"encoders": [{"name": "sem", "kind": "classic_color_layout"},
                                     {"name": "cap", "kind": "classic_text_hash"}]})
    try:
        queue.put((encoder, validate_stage("mining", cfg, RunLayout(root), encoder=encoder)))
    except BaseException as exc:  # report, never hang the parent
        queue.put((encoder, repr(exc)))


def test_concurrent_processes_keep_each_others_config(cfg, layout):
    """Airflow runs tasks of one run as separate processes on one GX project: each must see
    the others' assets and docs instead of overwriting them."""
    write_ingest(layout, image_rows())
    run("ingest", cfg, layout)  # this process now caches the project's context
    for enc in ("sem", "cap"):
        write_mining(layout, candidate_rows(), encoder=enc)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_validate_in_child, args=(str(layout.root), e, queue))
             for e in ("sem", "cap")]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join()
    assert all(isinstance(r, dict) and r["success"] for r in results.values()), results
    # back in this process: the stale cached context must not drop the children's assets
    write_pairs(layout, pair_rows())
    assert run("pairs", cfg, layout)["success"]
    config = (layout.gx_dir / "gx" / "great_expectations.yml").read_text()
    for asset in ("megapairs_ingest", "megapairs_mining_sem", "megapairs_mining_cap",
                  "megapairs_pairs"):
        assert asset in config
    index = (layout.data_docs_dir / "index.html").read_text()
    assert "megapairs_mining_sem" in index and "megapairs_mining_cap" in index


# ---------------------------------------------------------------- quality gates beyond schema

WORDS = ("red", "blue", "tiny", "large", "beach", "forest", "dog", "boat", "night", "snow", "two", "three",
         "striped", "wooden", "city", "bridge", "cat", "flowers", "mountain", "river", "old", "bright")


def gate_cfg(**gates):
    return parse_config({
        "encoders": [{"name": "sem", "kind": "classic_color_layout"},
                     {"name": "cap", "kind": "classic_text_hash", "band": [0.5, 0.9]}],
        "gates": {"min_rows": 10, **gates},
    })


def many_triplets(n: int = 40, same_instructions: bool = False) -> list[dict]:
    """n well-formed triplets whose instructions are all different (or all the same)."""
    import random

    rng = random.Random(0)
    rows = []
    for k in range(n):
        q, t = 2 * k, 2 * k + 1
        q_id, t_id = _id(q), _id(t)
        others = [i for i in range(2 * n, 2 * n + 5)]
        if same_instructions:
            q_text = ["Find a similar photo.", "Show me the same scene.", "Retrieve a related image."]
        else:
            q_text = [" ".join(["Find", *rng.sample(WORDS, 6)]) + f" {k}{j}." for j in range(3)]
        rows.append(dict(triplet_rows()[0], q_img=f"/data/img/{q_id}.jpg", t_img=f"/data/img/{t_id}.jpg",
                         hns=[f"/data/img/{q_id}.jpg"] + [f"/data/img/{_id(i)}.jpg" for i in others],
                         pair_id=_pair_id(q_id, t_id), q_id=q_id, t_id=t_id, q_text=q_text))
    return rows


def write_annotate_outcomes(layout, accepted: int, failed: int) -> None:
    from megapairs_ops.schemas import FAILURE_SCHEMA
    from megapairs_ops.storage import write_problem_rows

    write_parquet(pa.table({"pair_id": [f"{i:016x}" for i in range(accepted)]}), layout.annotations)
    write_problem_rows([{"pair_id": f"{i:016x}", "reason": "refusal", "stage": "annotate", "attempts": 3}
                        for i in range(failed)], FAILURE_SCHEMA, layout.failures_part("annotate"))


def gates_of(result) -> dict:
    return {g["gate"]: g for g in result["gates"]}


def test_diverse_triplets_pass_every_gate_with_their_figures(layout):
    write_triplets(layout, many_triplets())
    write_annotate_outcomes(layout, accepted=40, failed=2)
    result = run("triplets", gate_cfg(), layout)
    gates = gates_of(result)
    assert {g: v["status"] for g, v in gates.items()} == dict.fromkeys(
        ["mean_instructions", "instruction_share", "opening_share", "distinct_2gram_ratio", "failure_rate"], "pass")
    assert gates["mean_instructions"]["observed"] == 3.0
    assert gates["instruction_share"]["observed"] == pytest.approx(1 / 40)
    assert gates["failure_rate"]["observed"] == pytest.approx(2 / 42)
    assert gates["distinct_2gram_ratio"]["observed"] > 0.5
    assert result["warnings"] == [] and result["warned_expectations"] == []


def test_collapsed_instructions_fail_the_instruction_share_gate(layout):
    write_triplets(layout, many_triplets(same_instructions=True))
    with pytest.raises(ValidationFailed) as err:
        run("triplets", gate_cfg(), layout)
    result = err.value.result
    assert result["failed_expectations"] == ["instruction_share"]
    assert "instruction_share (observed 1 > max 0.2: 'Find a similar photo.' in 40 of 40 triplets)" in str(err.value)
    gates = gates_of(result)
    assert gates["instruction_share"]["status"] == "fail"
    assert gates["distinct_2gram_ratio"]["status"] == "warn"  # a warn gate broke too, reported only
    assert any(w.startswith("triplets gate distinct_2gram_ratio") for w in result["warnings"])
    assert gates["failure_rate"]["status"] == "skipped"  # no annotate outputs to judge
    # Kept for the report even though the stage failed.
    saved = load_gate_results(layout)
    assert [s["suite"] for s in saved] == ["megapairs_triplets"] and saved[0]["success"] is False


def test_a_warn_gate_reports_and_passes(layout):
    write_triplets(layout, many_triplets(same_instructions=True))
    result = run("triplets", gate_cfg(instruction_share={"severity": "warn"}), layout)
    assert result["success"] is True and result["failed_expectations"] == []
    assert set(result["warned_expectations"]) == {"instruction_share", "distinct_2gram_ratio"}
    assert gates_of(result)["instruction_share"]["status"] == "warn"
    assert any("instruction_share (observed 1 > max 0.2" in w for w in result["warnings"])


def test_mean_instructions_and_failure_rate_gates(layout):
    write_triplets(layout, many_triplets())
    write_annotate_outcomes(layout, accepted=40, failed=20)
    with pytest.raises(ValidationFailed) as err:
        run("triplets", gate_cfg(mean_instructions={"min": 3.5, "severity": "fail"}, failure_rate=0.25), layout)
    assert err.value.result["failed_expectations"] == ["mean_instructions", "failure_rate"]
    assert "failure_rate (observed 0.333 > max 0.25: 20 of 60 pairs failed (refusal: 20))" in str(err.value)


def test_small_tables_skip_share_gates_and_null_turns_a_gate_off(layout):
    write_triplets(layout, many_triplets(n=8, same_instructions=True))
    result = run("triplets", gate_cfg(opening_share=None), layout)
    gates = gates_of(result)
    assert gates["instruction_share"]["status"] == "skipped" and "gates.min_rows (10)" in gates["instruction_share"]["detail"]
    assert gates["opening_share"]["status"] == "off"
    assert result["success"] is True


def test_ingest_quarantine_and_duplicate_rates(layout):
    from megapairs_ops.schemas import QUARANTINE_SCHEMA
    from megapairs_ops.storage import write_problem_rows

    rows = [dict(r, duplicate_paths=[]) for r in image_rows()]
    rows[0]["duplicate_paths"] = [f"/data/img/copy{i}.jpg" for i in range(4)]
    write_ingest(layout, rows)
    write_problem_rows([{"path": f"/bad/{i}.jpg", "reason": "truncated_image" if i < 7 else "not_an_image",
                         "detail": "x", "stage": "ingest"} for i in range(9)],
                       QUARANTINE_SCHEMA, layout.quarantine_part("ingest"))
    with pytest.raises(ValidationFailed) as err:
        run("ingest", gate_cfg(duplicate_rate={"max": 0.1}), layout)
    assert err.value.result["failed_expectations"] == ["quarantine_rate"]
    assert "9 of 25 inputs quarantined (truncated_image: 7, not_an_image: 2)" in str(err.value)
    gates = gates_of(err.value.result)
    assert gates["duplicate_rate"]["status"] == "warn" and gates["duplicate_rate"]["observed"] == pytest.approx(4 / 25)


def test_an_encoder_that_finds_nothing_breaks_the_encoder_share_gate(layout):
    rows = [dict(r, encoders=["cap"], sims=[0.7]) for r in pair_rows() * 3]
    for i, r in enumerate(rows):  # distinct pairs
        q, t = _id(20 + 2 * i), _id(21 + 2 * i)
        r.update(q_id=q, t_id=t, pair_id=_pair_id(q, t))
    write_pairs(layout, rows)
    result = run("pairs", gate_cfg(min_rows=5), layout)
    gates = gates_of(result)
    assert gates["encoder_share_sem"]["status"] == "warn" and gates["encoder_share_sem"]["observed"] == 0
    assert gates["encoder_share_cap"]["status"] == "pass" and gates["encoder_share_cap"]["observed"] == 1
    with pytest.raises(ValidationFailed, match="encoder_share_sem"):
        run("pairs", gate_cfg(min_rows=5, encoder_share={"severity": "fail"}), layout)


def test_gate_config_keys():
    cfg = gate_cfg(instruction_share={"severity": "warn"}, failure_rate=0.05, opening_share=None)
    assert (cfg.gates.instruction_share.max, cfg.gates.instruction_share.severity) == (0.2, "warn")
    assert (cfg.gates.failure_rate.max, cfg.gates.failure_rate.severity) == (0.05, "fail")
    assert cfg.gates.opening_share.max is None
    for gates, problem in [
        ({"instruction_share": 1.5}, "gates.instruction_share: threshold must be a share between 0 and 1"),
        ({"failure_rate": {"severity": "stop"}}, "gates.failure_rate.severity: Input should be 'warn' or 'fail'"),
        ({"opening_share": {"min": 0.2}}, "gates.opening_share.min: unknown key"),
        ({"min_rows": 0}, "gates.min_rows: Input should be greater than or equal to 1"),
        ({"diversity": 1}, "gates.diversity: unknown key"),
    ]:
        with pytest.raises(ConfigError) as err:
            gate_cfg(**gates)
        assert str(err.value).startswith(f"<config>: {problem}"), str(err.value)
