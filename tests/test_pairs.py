import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megapairs_ops.config import parse_config
from megapairs_ops.pairs import build_pairs
from megapairs_ops.storage import RunLayout

# Far-apart perceptual hashes, except D which is A with one bit flipped (the same picture).
PHASH = {"A": 0x0F0F_0F0F_0F0F_0F0F, "B": 0x00FF_00FF_00FF_00FF, "C": 0x3333_3333_3333_3333,
         "D": 0x0F0F_0F0F_0F0F_0F0E, "E": 0x5555_5555_5555_5555, "F": 0x7777_0000_7777_0000,
         "G": 0x1248_1248_1248_1248, "H": 0x0000_FFFF_0000_FFFF}
SCHEMA = pa.schema([("q_id", pa.string()), ("t_id", pa.string()), ("sim", pa.float32()), ("rank", pa.int32())])


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _write(layout: RunLayout, candidates: dict, neighbours: dict):
    layout.images.parent.mkdir(parents=True)
    pq.write_table(
        pa.table({"image_id": list(PHASH), "phash": [_signed(v) for v in PHASH.values()],
                  "path": [f"/img/{k}.png" for k in PHASH]}),
        layout.images,
    )
    for name, rows in [*((("cand", e), r) for e, r in candidates.items()), *((("neigh", e), r) for e, r in neighbours.items())]:
        kind, enc = name
        path = layout.candidates(enc) if kind == "cand" else layout.neighbours(enc)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.table({"q_id": [r[0] for r in rows], "t_id": [r[1] for r in rows],
                          "sim": [r[2] for r in rows], "rank": list(range(1, len(rows) + 1))}, schema=SCHEMA)
        pq.write_table(table, path)


def _cfg(cap=5, n_neg=2, seed=0):
    return parse_config({
        "seed": seed,
        "encoders": [{"name": "e1", "kind": "classic_color_layout"}, {"name": "e2", "kind": "classic_texture"}],
        "mining": {"k": 10, "max_targets_per_query": 3, "n_hard_negatives": n_neg},
        "pairs": {"max_pairs_per_query": cap, "near_duplicate_hamming": 4},
    })


CANDIDATES = {
    "e1": [("A", "B", 0.85), ("A", "C", 0.90), ("A", "D", 0.88)],
    "e2": [("A", "B", 0.82), ("B", "C", 0.81)],
}
NEIGHBOURS = {
    "e1": [("A", "H", 0.97), ("A", "C", 0.90), ("A", "D", 0.88), ("A", "B", 0.85), ("A", "E", 0.6), ("A", "F", 0.5)],
    "e2": [("A", "B", 0.82), ("A", "G", 0.4), ("B", "C", 0.81), ("B", "A", 0.7)],
}


def _pairs(layout):
    return {(r["q_id"], r["t_id"]): r for r in pq.read_table(layout.pairs).to_pylist()}


def test_union_dedup_negatives_and_failures(tmp_path):
    layout = RunLayout(tmp_path)
    _write(layout, CANDIDATES, NEIGHBOURS)
    stats = build_pairs(_cfg(), layout)
    pairs = _pairs(layout)
    # (A, D) is a perceptual duplicate; (B, C) cannot get 2 negatives from B's retrieved set {A, C}.
    assert set(pairs) == {("A", "B"), ("A", "C")}
    ab = pairs[("A", "B")]
    assert ab["encoders"] == ["e1", "e2"]
    assert ab["sims"] == pytest.approx([0.85, 0.82])
    assert ab["max_sim"] == pytest.approx(0.85)
    assert ab["pair_id"] == hashlib.sha256(b"A:B").hexdigest()[:16]
    # A's retrieved set below the band's top: C, D, B, E, F, G (H is a near-duplicate of A at 0.97).
    for (q, t), row in pairs.items():
        assert len(row["hn_ids"]) == 2 and len(set(row["hn_ids"])) == 2
        assert q not in row["hn_ids"] and t not in row["hn_ids"] and "H" not in row["hn_ids"]
        assert set(row["hn_ids"]) <= {"B", "C", "D", "E", "F", "G"}
    assert stats == {
        "candidate_rows": 5, "union_pairs": 4, "near_duplicates_dropped": 1, "over_query_cap_dropped": 0,
        "short_of_hard_negatives": 1, "pairs": 2, "pairs_by_number_of_encoders": {1: 2, 2: 1},
    }
    failures = pq.read_table(layout.failures_part("pairs")).to_pylist()
    assert [(f["q_id"], f["t_id"], f["reason"]) for f in failures] == [("B", "C", "insufficient_hard_negatives")]


def test_cap_prefers_pairs_found_by_more_views(tmp_path):
    layout = RunLayout(tmp_path)
    _write(layout, CANDIDATES, NEIGHBOURS)
    stats = build_pairs(_cfg(cap=1, n_neg=0), layout)
    assert set(_pairs(layout)) == {("A", "B"), ("B", "C")}
    assert stats["over_query_cap_dropped"] == 1


def test_negatives_are_seeded_and_deterministic(tmp_path):
    draws = {}
    for seed in (0, 0, 1, 2, 3):
        layout = RunLayout(tmp_path / f"s{seed}-{len(draws)}")
        _write(layout, CANDIDATES, NEIGHBOURS)
        build_pairs(_cfg(n_neg=3, seed=seed), layout)
        draws.setdefault(seed, []).append(_pairs(layout)[("A", "B")]["hn_ids"])
    assert draws[0][0] == draws[0][1]
    assert len({tuple(v[0]) for v in draws.values()}) > 1


def test_target_duplicate_never_a_negative(tmp_path):
    # D is a perceptual twin of A: for the pair (C, A), D must not be offered as A's negative.
    cands = {"e1": [("C", "A", 0.9)], "e2": []}
    neigh = {"e1": [("C", "A", 0.9), ("C", "D", 0.85), ("C", "E", 0.5), ("C", "F", 0.4)], "e2": []}
    layout = RunLayout(tmp_path)
    _write(layout, cands, neigh)
    build_pairs(_cfg(n_neg=2), layout)
    assert sorted(_pairs(layout)[("C", "A")]["hn_ids"]) == ["E", "F"]
