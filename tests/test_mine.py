import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megapairs_ops.config import parse_config
from megapairs_ops.mine import mine_candidates
from megapairs_ops.storage import RunLayout


def _write_embeddings(layout: RunLayout, name: str, vectors: np.ndarray) -> list[str]:
    ids = [f"{i:016x}" for i in range(len(vectors))]
    layout.embedding_dir(name).mkdir(parents=True)
    np.save(layout.embedding_vectors(name), vectors.astype(np.float32))
    pq.write_table(pa.table({"image_id": ids}), layout.embedding_ids(name))
    return ids


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n // 10, d))
    return _unit(centres[rng.integers(0, len(centres), n)] + 0.35 * rng.normal(size=(n, d)))


def _cfg(band=(0.8, 0.96), k=10, cap=3, batch=64):
    return parse_config(
        {
            "encoders": [{"name": "e", "kind": "classic_color_layout", "band": list(band)}],
            "mining": {"k": k, "max_targets_per_query": cap, "query_batch_size": batch},
        }
    )


@pytest.mark.parametrize("data", ["random", "clustered"])
def test_neighbours_equal_numpy_brute_force(tmp_path, data):
    vectors = _unit(np.random.default_rng(1).normal(size=(300, 24))) if data == "random" else _clustered(300, 24, 2)
    layout = RunLayout(tmp_path)
    ids = _write_embeddings(layout, "e", vectors)
    cfg = _cfg(k=7, batch=50)  # several query batches
    mine_candidates(cfg, "e", layout)

    got = pq.read_table(layout.neighbours("e")).to_pandas()
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    for q in range(len(vectors)):
        rows = got[got.q_id == ids[q]].sort_values("rank")
        expected = np.sort(sims[q])[::-1][:7]
        assert list(rows["rank"]) == list(range(1, 8))
        np.testing.assert_allclose(rows.sim.to_numpy(), expected, atol=1e-5)
        # Same neighbours up to ties: every returned neighbour's true sim matches its reported sim.
        t_rows = [ids.index(t) for t in rows.t_id]
        np.testing.assert_allclose(sims[q, t_rows], rows.sim.to_numpy(), atol=1e-5)
        assert ids[q] not in set(rows.t_id)


def test_band_and_cap(tmp_path):
    vectors = _clustered(400, 16, 3)
    layout = RunLayout(tmp_path)
    _write_embeddings(layout, "e", vectors)
    stats = mine_candidates(_cfg(band=(0.5, 0.9), k=10, cap=2), "e", layout)
    cand = pq.read_table(layout.candidates("e")).to_pandas()
    neigh = pq.read_table(layout.neighbours("e")).to_pandas()
    assert stats["candidates"] == len(cand) > 0
    assert ((cand.sim > 0.5) & (cand.sim < 0.9)).all()
    assert cand.groupby("q_id").size().max() <= 2
    assert (cand.q_id != cand.t_id).all()
    assert not cand.duplicated(["q_id", "t_id"]).any()
    # The cap keeps each query's most similar in-band neighbours.
    in_band = neigh[(neigh.sim > 0.5) & (neigh.sim < 0.9)].sort_values(["q_id", "rank"])
    expected = in_band.groupby("q_id").head(2)
    assert set(zip(expected.q_id, expected.t_id)) == set(zip(cand.q_id, cand.t_id))


def test_identical_vectors_are_not_candidates(tmp_path):
    base = _clustered(50, 8, 4)
    vectors = np.vstack([base, base[:5]])  # five exact copies: sim 1.0, above any band
    layout = RunLayout(tmp_path)
    ids = _write_embeddings(layout, "e", vectors)
    mine_candidates(_cfg(band=(0.2, 0.96), k=5), "e", layout)
    cand = pq.read_table(layout.candidates("e")).to_pandas()
    copies = {(ids[i], ids[50 + i]) for i in range(5)} | {(ids[50 + i], ids[i]) for i in range(5)}
    assert not copies & set(zip(cand.q_id, cand.t_id))
    assert (cand.sim < 0.96).all()


def test_tiny_corpus_and_mismatch(tmp_path):
    layout = RunLayout(tmp_path)
    _write_embeddings(layout, "e", _unit(np.ones((1, 4))))
    assert mine_candidates(_cfg(k=3), "e", layout)["candidates"] == 0
    pq.write_table(pa.table({"image_id": ["a", "b"]}), layout.embedding_ids("e"))
    with pytest.raises(ValueError, match="inconsistent"):
        mine_candidates(_cfg(k=3), "e", layout)
