import json

import pyarrow as pa
import pyarrow.parquet as pq

from megapairs_ops.config import parse_config
from megapairs_ops.layout import RunLayout
from megapairs_ops.schemas import FAILURE_SCHEMA, PAIRS_SCHEMA, QUARANTINE_SCHEMA, TRIPLET_SCHEMA
from megapairs_ops.stages.publish.triplets import publish_triplets, run_config_path
from megapairs_ops.storage import read_json, write_problem_rows

IDS = [f"{i:016x}" for i in range(8)]


def _setup(layout: RunLayout, n_pairs: int):
    layout.images.parent.mkdir(parents=True)
    pq.write_table(pa.table({"image_id": IDS, "path": [f"/corpus/img {i} é.png" for i in range(8)]}), layout.images)
    pairs = [
        {"pair_id": f"p{i:03d}", "q_id": IDS[i % 4], "t_id": IDS[4 + i % 4], "encoders": ["a", "b"],
         "sims": [0.85, 0.9], "max_sim": 0.9, "hn_ids": [IDS[(i + 1) % 4], IDS[(i + 2) % 4]]}
        for i in range(n_pairs)
    ]
    pq.write_table(pa.Table.from_pylist(pairs, schema=PAIRS_SCHEMA), layout.pairs)
    # One pair was not annotated (it failed): it must not be published.
    annotations = [
        {"pair_id": p["pair_id"], "description": f"desc {p['pair_id']}", "instructions": ["i1", "i2", "i3"],
         "word_num": 70, "describe_backend": "template", "describe_model": "template-baseline-v1",
         "instruct_backend": "template", "instruct_model": "template-baseline-v1", "prompt_version": "v1",
         "attempts": 1}
        for p in pairs[1:]
    ]
    pq.write_table(pa.Table.from_pylist(annotations), layout.annotations)
    write_problem_rows([{"path": "/corpus/bad.jpg", "reason": "truncated_image", "stage": "ingest"}],
                       QUARANTINE_SCHEMA, layout.quarantine_part("ingest"))
    write_problem_rows([{"pair_id": "p000", "reason": "refusal", "stage": "annotate", "attempts": 3}],
                       FAILURE_SCHEMA, layout.failures_part("annotate"))


def test_released_format_parts_and_jsonl(tmp_path):
    layout = RunLayout(tmp_path)
    _setup(layout, 7)
    cfg = parse_config({"encoders": [{"name": "a", "kind": "classic_color_layout"}],
                        "mining": {"n_hard_negatives": 2}, "publish": {"part_rows": 4}})
    stats = publish_triplets(cfg, layout, run_id="run-1")
    curation = stats.pop("curation")
    assert stats == {"triplets": 6, "parts": 2, "quarantined": 1, "failed": 1, "run_id": "run-1"}
    assert curation["rejects_file"] is None and curation["excluded"] == 0
    assert pq.read_table(layout.failures_part("curation")).num_rows == 0
    assert parse_config(read_json(run_config_path(layout))) == cfg

    parts = sorted(layout.triplets_dir.glob("part-*.parquet"))
    assert [pq.read_metadata(p).num_rows for p in parts] == [4, 2]
    table = pq.read_table(layout.triplets_dir)
    assert table.schema.equals(TRIPLET_SCHEMA)
    rows = table.to_pylist()
    assert [r["pair_id"] for r in rows] == [f"p{i:03d}" for i in range(1, 7)]
    for r in rows:
        assert r["hns"][0] == r["q_img"] and len(r["hns"]) == 3
        assert r["t_img"] not in r["hns"] and r["run_id"] == "run-1"
    first = rows[0]
    assert first["q_img"] == "/corpus/img 1 é.png" and first["t_img"] == "/corpus/img 5 é.png"
    assert first["hns"][1:] == ["/corpus/img 2 é.png", "/corpus/img 3 é.png"]

    lines = [json.loads(x) for x in layout.triplets_jsonl.read_text(encoding="utf-8").splitlines()]
    assert [set(x) for x in lines] == [{"pair_id", "q_img", "q_text", "t_img", "hns"}] * 6
    assert lines[0]["q_img"] == first["q_img"]
    assert pq.read_table(layout.quarantine).column("reason").to_pylist() == ["truncated_image"]
    assert pq.read_table(layout.failures).column("reason").to_pylist() == ["refusal"]


def test_republish_replaces_whole_directory(tmp_path):
    layout = RunLayout(tmp_path)
    _setup(layout, 7)
    cfg = parse_config({"encoders": [{"name": "a", "kind": "classic_color_layout"}], "publish": {"part_rows": 2}})
    publish_triplets(cfg, layout, "r")
    assert len(list(layout.triplets_dir.glob("part-*"))) == 3
    cfg = parse_config({"encoders": [{"name": "a", "kind": "classic_color_layout"}], "publish": {"part_rows": 100}})
    publish_triplets(cfg, layout, "r")
    assert len(list(layout.triplets_dir.glob("part-*"))) == 1
    assert not list(tmp_path.glob(".triplets*"))
