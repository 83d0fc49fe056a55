import hashlib
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megapairs_ops.config import ConfigError, parse_config
from megapairs_ops.layout import RunLayout
from megapairs_ops.stages.pairs import build_pairs

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
    assert set(stats.pop("step_seconds")) >= {"union_candidates_per_pair", "hard_negative_pools"}
    assert stats == {
        "candidate_rows": 5, "union_pairs": 4, "near_duplicates_dropped": 1, "over_query_cap_dropped": 0,
        "short_of_hard_negatives": 1, "pairs": 2, "pairs_by_number_of_encoders": {1: 2, 2: 1},
        "dropped_by_reason": {"near_duplicate_of_query": 1, "over_query_cap": 0, "insufficient_hard_negatives": 1},
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


def _draw_key(seed: int, image_id: str) -> int:
    # DuckDB's md5_number_lower: the digest's last 8 bytes, little-endian.
    return int.from_bytes(hashlib.md5(f"{seed}:{image_id}".encode()).digest()[8:], "little")


def _reference_pairs(phash, candidates, neighbours, bands, cap, n_neg, hamming, seed):
    """The pairs stage's rules in plain Python: the known answer for any candidate set."""
    def twins(a, b):
        return bin((phash[a] ^ phash[b]) & ((1 << 64) - 1)).count("1") <= hamming

    found: dict = {}
    for enc, rows in candidates.items():
        for q, t, sim in rows:
            found.setdefault((q, t), {})[enc] = sim
    kept = {qt: views for qt, views in found.items() if not twins(*qt)}
    by_query: dict = {}
    for (q, t), views in kept.items():
        by_query.setdefault(q, []).append((-len(views), -max(views.values()), t))
    capped = [(q, t) for q, rows in by_query.items() for _, _, t in sorted(rows)[:cap]]
    pools: dict = {}
    for enc, rows in neighbours.items():
        for q, n, sim in rows:
            if sim < bands[enc][1] and n != q:
                pools.setdefault(q, set()).add(n)
    pairs, short = {}, set()
    for q, t in capped:
        order = sorted(pools.get(q, ()), key=lambda n: _draw_key(seed, q) ^ _draw_key(seed, n))
        negatives = [n for n in order if n != t and not twins(n, t)]
        views = dict(sorted(kept[(q, t)].items()))
        if len(negatives) >= n_neg:
            pairs[(q, t)] = (list(views), list(views.values()), negatives[:n_neg])
        else:
            short.add((q, t))
    return pairs, short


@pytest.mark.parametrize("seed", [0, 7])
def test_random_candidate_set_matches_the_reference(tmp_path, seed):
    rng = np.random.default_rng(seed)
    ids = [f"{i:016x}" for i in rng.choice(1 << 40, 120, replace=False)]
    phash = {i: int(v) for i, v in zip(ids, rng.integers(-(1 << 63), (1 << 63) - 1, len(ids)))}
    for a, b in zip(ids[0:40:4], ids[1:40:4]):  # perceptual twins, some of them each other's neighbours
        phash[b] = phash[a] ^ 0b101
    encoders = {"e1": (0.8, 0.96), "e2": (0.75, 0.95), "e3": (0.8, 0.96)}
    candidates, neighbours = {}, {}
    for enc, (lo, hi) in encoders.items():
        candidates[enc], neighbours[enc] = [], []
        for qi, q in enumerate(ids):
            others = [ids[(qi + d) % len(ids)] for d in rng.choice(np.arange(1, 15), 8, replace=False)]
            sims = np.sort(rng.uniform(0.6, 1.0, 8))[::-1].astype(np.float32)
            neighbours[enc] += [(q, t, float(s)) for t, s in zip(others, sims)]
            candidates[enc] += list(itertools.islice(((q, t, float(s)) for t, s in zip(others, sims) if lo < s < hi), 3))

    layout = RunLayout(tmp_path)
    layout.images.parent.mkdir(parents=True)
    pq.write_table(pa.table({"image_id": ids, "phash": [phash[i] for i in ids]}), layout.images)
    for enc in encoders:
        for kind, rows in (("candidates", candidates[enc]), ("neighbours", neighbours[enc])):
            path = getattr(layout, kind)(enc)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"q_id": [r[0] for r in rows], "t_id": [r[1] for r in rows],
                                     "sim": [r[2] for r in rows], "rank": [1] * len(rows)}, schema=SCHEMA), path)
    cfg = parse_config({
        "seed": seed,
        "encoders": [{"name": e, "kind": "classic_texture", "band": list(b)} for e, b in encoders.items()],
        "mining": {"k": 8, "max_targets_per_query": 3, "n_hard_negatives": 9},
        "pairs": {"max_pairs_per_query": 2, "near_duplicate_hamming": 4},
        "duckdb": {"memory_limit": "256MB", "threads": 2, "temp_directory": "spill"},
    })
    stats = build_pairs(cfg, layout)
    want, want_short = _reference_pairs(phash, candidates, neighbours, encoders, 2, 9, 4, seed)
    assert want and want_short  # the data exercises both outcomes

    got = pq.read_table(layout.pairs).to_pylist()
    assert [r["pair_id"] for r in got] == sorted(r["pair_id"] for r in got)
    assert {(r["q_id"], r["t_id"]) for r in got} == set(want)
    for r in got:
        encs, sims, negatives = want[(r["q_id"], r["t_id"])]
        assert r["encoders"] == encs and r["sims"] == pytest.approx(sims)
        assert r["hn_ids"] == negatives
    failures = pq.read_table(layout.failures_part("pairs")).to_pylist()
    assert {(f["q_id"], f["t_id"]) for f in failures} == want_short
    assert stats["pairs"] == len(want) and stats["short_of_hard_negatives"] == len(want_short)
    assert stats["near_duplicates_dropped"] > 0
    assert stats["candidate_rows"] == sum(len(rows) for rows in candidates.values())
    assert (tmp_path / "spill").is_dir()  # a relative temp_directory lives in the run directory


def test_duckdb_keys_are_validated_with_one_line_errors():
    base = {"encoders": [{"name": "e", "kind": "classic_texture"}]}
    with pytest.raises(ConfigError, match=r"duckdb\.memory_limit: '8 parsecs' is not a memory size"):
        parse_config({**base, "duckdb": {"memory_limit": "8 parsecs"}})
    with pytest.raises(ConfigError, match=r"duckdb\.threads"):
        parse_config({**base, "duckdb": {"threads": 0}})
    assert parse_config({**base, "duckdb": {"memory_limit": "6GiB"}}).duckdb.memory_limit == "6GiB"
    # The keys that moved say where to.
    with pytest.raises(ConfigError, match=r"pairs: memory_limit moved to the duckdb section"):
        parse_config({**base, "pairs": {"memory_limit": "6GiB"}})
    with pytest.raises(ConfigError, match=r"embed: memory_limit moved to duckdb.memory_limit"):
        parse_config({**base, "embed": {"memory_limit": "6GiB"}})
