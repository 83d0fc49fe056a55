"""The curation loop at publish: rejected pairs and images are withheld with their reasons, a
rejected hard negative is replaced from the query's retrieved set (or its pair withheld when none is
left), and the rejects file is read strictly."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megapairs_ops.config import ConfigError, parse_config
from megapairs_ops.layout import RunLayout
from megapairs_ops.schemas import FAILURE_SCHEMA, PAIRS_SCHEMA
from megapairs_ops.stages.publish.curation import CurationError, load_rejects, rejects_fingerprint
from megapairs_ops.stages.publish.triplets import publish_triplets, run_config_path
from megapairs_ops.storage import read_json, write_problem_rows

IDS = [f"{i:016x}" for i in range(14)]
# Far-apart perceptual hashes, except image 9, a perceptual twin of image 1.
PHASH = [i * 0x0F0F0F0F for i in range(14)]
PHASH[9] = PHASH[1] ^ 0b11


def path(i: int) -> str:
    return f"/corpus/{i}.png"


PID = {f"p{i}": f"{0xa0 + i:016x}" for i in range(8)}
NAME = {v: k for k, v in PID.items()}


def pair(name: str, q: int, t: int, hns: list[int]) -> dict:
    return {"pair_id": PID[name], "q_id": IDS[q], "t_id": IDS[t], "encoders": ["a"], "sims": [0.9], "max_sim": 0.9,
            "hn_ids": [IDS[h] for h in hns]}


PAIRS = [
    pair("p0", 0, 1, [2, 3]),    # negative 2 rejected: replaced from {4, 5} (8 above band, 9 twin of 1)
    pair("p1", 0, 4, [2, 5]),    # negative 2 rejected: replaced from {1, 3, 9}
    pair("p2", 6, 7, [8, 9]),    # rejected as a pair (its target 7 is rejected too; the pair reason wins)
    pair("p3", 10, 11, [2, 9]),  # negative 2 rejected, and q10 retrieved nothing else: withheld
    pair("p4", 7, 6, [8, 9]),    # query 7 rejected
    pair("p5", 3, 12, [4, 5]),   # target 12 rejected
    pair("p6", 5, 13, [2, 4]),   # negative 2 rejected, but never annotated: not counted
    pair("p7", 13, 5, [4, 8]),   # untouched
]
NEIGHBOURS = {0: [(1, 0.9), (2, 0.9), (3, 0.9), (4, 0.9), (5, 0.85), (8, 0.97), (9, 0.9)],
              10: [(11, 0.9), (2, 0.88), (9, 0.86)]}


@pytest.fixture
def layout(tmp_path):
    layout = RunLayout(tmp_path / "run")
    layout.images.parent.mkdir(parents=True)
    pq.write_table(pa.table({"image_id": IDS, "path": [path(i) for i in range(14)],
                             "phash": pa.array(PHASH, pa.int64())}), layout.images)
    pq.write_table(pa.Table.from_pylist(PAIRS, schema=PAIRS_SCHEMA), layout.pairs)
    annotations = [{"pair_id": p["pair_id"], "description": "d", "instructions": ["x", "y", "z"], "word_num": 70,
                    "describe_backend": "template", "describe_model": "m", "instruct_backend": "template",
                    "instruct_model": "m", "prompt_version": "v1", "attempts": 1}
                   for p in PAIRS if p["pair_id"] != PID["p6"]]
    pq.write_table(pa.Table.from_pylist(annotations), layout.annotations)
    layout.neighbours("a").parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(
        [{"q_id": IDS[q], "t_id": IDS[n], "sim": s, "rank": r + 1}
         for q, ns in NEIGHBOURS.items() for r, (n, s) in enumerate(ns)],
        schema=pa.schema([("q_id", pa.string()), ("t_id", pa.string()), ("sim", pa.float32()), ("rank", pa.int32())])),
        layout.neighbours("a"))
    write_problem_rows([{"pair_id": PID["p6"], "reason": "refusal", "stage": "annotate", "attempts": 3}],
                       FAILURE_SCHEMA, layout.failures_part("annotate"))
    return layout


def config(tmp_path, rejects: str | None, **curation):
    rejects_file = None
    if rejects is not None:
        rejects_file = tmp_path / "rejects.csv"
        rejects_file.write_text(rejects)
    return parse_config({
        "encoders": [{"name": "a", "kind": "classic_color_layout"}],
        "mining": {"n_hard_negatives": 2},
        "pairs": {"near_duplicate_hamming": 4},
        "curation": {"rejects_file": str(rejects_file) if rejects_file else None, **curation},
    })


REJECTS = (
    "kind,id,reason,curator\n"
    "# rejected after the run of 2026-11-20\n"
    f"image,{IDS[2]},blurry,ann\n"
    f"pair,{PID['p2']},off-topic,ann\n"
    f"image,{IDS[7]},watermark,bob\n"
    f"image,{IDS[12]},nsfw,bob\n"
    "\n"
    f"image,{'f' * 64},not in this run,\n"
)


def publish(cfg, layout):
    stats = publish_triplets(cfg, layout, "run-2")
    triplets = {NAME[r["pair_id"]]: r for r in pq.read_table(layout.triplets_dir).to_pylist()}
    withheld = {NAME[r["pair_id"]]: r for r in pq.read_table(layout.failures_part("curation")).to_pylist()}
    return stats, triplets, withheld


def test_rejections_are_withheld_with_reasons_and_negatives_replaced(layout, tmp_path):
    cfg = config(tmp_path, REJECTS)
    stats, triplets, withheld = publish(cfg, layout)

    assert sorted(triplets) == ["p0", "p1", "p7"]
    assert {k: (v["reason"], v["stage"]) for k, v in withheld.items()} == {
        "p2": ("rejected_pair", "curation"),
        "p3": ("rejected_negative_without_replacement", "curation"),
        "p4": ("rejected_query_image", "curation"),
        "p5": ("rejected_target_image", "curation"),
    }
    assert withheld["p2"]["detail"] == "off-topic (rejects.csv line 4)"
    assert withheld["p4"]["detail"] == "watermark (rejects.csv line 5)"
    assert withheld["p4"]["q_id"] == IDS[7] and withheld["p4"]["attempts"] == 0

    p0, p1 = triplets["p0"]["hns"], triplets["p1"]["hns"]
    assert p0[:2] == [path(0), path(3)] and p0[2] in (path(4), path(5))
    assert p1[:2] == [path(0), path(5)] and p1[2] in (path(1), path(3), path(9))
    assert all(path(2) not in t["hns"] for t in triplets.values())
    assert triplets["p7"]["hns"] == [path(13), path(4), path(8)]

    assert stats["failed"] == 5  # four withheld + the annotate failure
    assert stats["curation"] == {
        "rejects_file": str((tmp_path / "rejects.csv").resolve()), "rejected_pairs": 1, "rejected_images": 4,
        "unmatched_pair_ids": 0, "unmatched_image_ids": 1, "excluded": 4,
        "excluded_by_reason": {"rejected_negative_without_replacement": 1, "rejected_pair": 1,
                               "rejected_query_image": 1, "rejected_target_image": 1},
        "negatives_replaced": 2, "pairs_with_replaced_negatives": 2,
    }
    merged = pq.read_table(layout.failures).to_pylist()
    assert sorted(r["stage"] for r in merged) == ["annotate"] + ["curation"] * 4

    # The same list gives the same replacements (seeded), and the run's config is recorded.
    _, again, _ = publish(cfg, layout)
    assert again["p0"]["hns"] == p0 and again["p1"]["hns"] == p1
    assert read_json(run_config_path(layout))["curation"]["rejects_file"] == stats["curation"]["rejects_file"]


def test_drop_policy_withholds_pairs_with_a_rejected_negative(layout, tmp_path):
    cfg = config(tmp_path, f"kind,id\nimage,{IDS[2]}\n", rejected_negatives="drop")
    stats, triplets, withheld = publish(cfg, layout)
    assert sorted(triplets) == ["p2", "p4", "p5", "p7"]
    assert {k: v["reason"] for k, v in withheld.items()} == {p: "rejected_negative_image" for p in ("p0", "p1", "p3")}
    assert withheld["p0"]["detail"] == "no reason given (rejects.csv line 2)"
    assert stats["curation"]["negatives_replaced"] == 0


def test_emptied_list_publishes_everything_again(layout, tmp_path):
    cfg = config(tmp_path, f"kind,id,reason\nimage,{IDS[7]},x\n")
    _, triplets, withheld = publish(cfg, layout)
    assert "p4" not in triplets and set(withheld) == {"p2", "p4"}
    (tmp_path / "rejects.csv").write_text("kind,id,reason\n")
    _, triplets, withheld = publish(cfg, layout)
    assert len(triplets) == 7 and withheld == {}
    _, triplets, withheld = publish(config(tmp_path, None), layout)
    assert len(triplets) == 7 and withheld == {}


def test_rejects_file_parsing(tmp_path):
    f = tmp_path / "r.csv"
    sha = "AB" * 32
    f.write_text("\ufeffKind , ID , Reason , note\n# a comment line\n\nIMAGE, " + sha + " ,dup,\n"
                 f"pair,{'0' * 16},\"a, quoted reason\",x\nimage,{'ab' * 8},later duplicate\n")
    rows = load_rejects(f).to_pylist()
    assert rows == [{"kind": "image", "id": "ab" * 8, "reason": "dup", "line": 4},
                    {"kind": "pair", "id": "0" * 16, "reason": "a, quoted reason", "line": 5}]
    f.write_text("# nothing listed yet\n")
    assert load_rejects(f).num_rows == 0


@pytest.mark.parametrize("content,problem", [
    ("id,reason\nabc,x\n", ":1: header must name columns kind and id"),
    ("kind,id\nvideo,0000000000000000\n", ":2: kind must be 'pair' or 'image'"),
    ("kind,id\npair,xyz\n", ":2: id must be a 16-hex pair_id"),
    ("kind,id\n\nimage,123\n", ":3: id must be a 16-hex image_id or a 64-hex sha256"),
    ("kind,id\npair,\n", ":2: id must be"),
])
def test_a_malformed_rejects_file_stops_publish_naming_the_line(content, problem, layout, tmp_path):
    cfg = config(tmp_path, content)
    with pytest.raises(CurationError) as err:
        publish_triplets(cfg, layout, "r")
    assert problem in str(err.value) and "\n" not in str(err.value)
    assert str(tmp_path / "rejects.csv") in str(err.value)
    assert isinstance(err.value, ConfigError)  # the CLI exits 2 and Airflow does not retry
    assert not layout.triplets_dir.exists()


def test_config_keys(tmp_path):
    from megapairs_ops.preflight import preflight, raise_on_fatal

    # The rejects file is publish's business: checked before a run that publishes.
    missing = parse_config({"encoders": [{"name": "a", "kind": "classic_texture"}],
                            "curation": {"rejects_file": str(tmp_path / "nope.csv")}})
    assert preflight(missing, {"ingest", "embed"}) == []
    with pytest.raises(ConfigError, match=r"curation.rejects_file: file '.*nope.csv' not found"):
        raise_on_fatal(preflight(missing, {"publish"}), "c.yaml")
    with pytest.raises(ConfigError, match="curation.rejected_negatives"):
        parse_config({"encoders": [{"name": "a", "kind": "classic_texture"}],
                      "curation": {"rejected_negatives": "keep"}})
    with pytest.raises(ConfigError, match="curation.gallery_per_encoder"):
        parse_config({"encoders": [{"name": "a", "kind": "classic_texture"}],
                      "curation": {"gallery_per_encoder": -1}})
    cfg = config(tmp_path, "kind,id\n")
    assert cfg.curation.compare_with == "auto" and cfg.curation.rejected_negatives == "replace"


def test_fingerprint_follows_the_files_content(tmp_path):
    cfg = config(tmp_path, "kind,id\n")
    before = rejects_fingerprint(cfg)
    (tmp_path / "rejects.csv").write_text(f"kind,id\nimage,{IDS[1]}\n")
    after = rejects_fingerprint(cfg)
    assert before["rejects_file"] == after["rejects_file"] and before["rejects_sha256"] != after["rejects_sha256"]
    assert rejects_fingerprint(config(tmp_path, None))["rejects_sha256"] is None


def test_without_retrieved_sets_a_rejected_negative_withholds_its_pair(layout, tmp_path):
    layout.neighbours("a").unlink()
    _, triplets, withheld = publish(config(tmp_path, f"kind,id\nimage,{IDS[2]}\n"), layout)
    assert {k: v["reason"] for k, v in withheld.items()} == dict.fromkeys(
        ("p0", "p1", "p3"), "rejected_negative_without_replacement")
    assert sorted(triplets) == ["p2", "p4", "p5", "p7"]
