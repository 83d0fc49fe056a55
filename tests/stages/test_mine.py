import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megapairs_ops.config import ConfigError, parse_config
from megapairs_ops.errors import ItemsNotDone
from megapairs_ops.layout import RunLayout
from megapairs_ops.stages.mine.flat import FlatSearcher, merge_topk_by_row
from megapairs_ops.stages.mine.index import Device, MiningResourceError, VectorFile, choose_index, resolve_device
from megapairs_ops.stages.mine.work import (
    finalize_mining,
    mine_candidates,
    plan_mining_work,
    run_mining_work,
)


def _write_embeddings(layout: RunLayout, name: str, vectors: np.ndarray) -> list[str]:
    ids = [f"{i:016x}" for i in range(len(vectors))]
    layout.embedding_dir(name).mkdir(parents=True)
    np.save(layout.embedding_vectors(name), vectors.astype(np.float32))
    pq.write_table(pa.table({"image_id": ids}), layout.embedding_ids(name))
    return ids


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n: int, d: int, seed: int, noise: float = 0.35) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n // 10, d))
    return _unit(centres[rng.integers(0, len(centres), n)] + noise * rng.normal(size=(n, d)))


def _cfg(band=(0.8, 0.96), k=10, cap=3, batch=64, **mining):
    return parse_config(
        {
            "encoders": [{"name": "e", "kind": "classic_color_layout", "band": list(band)}],
            "mining": {"k": k, "max_targets_per_query": cap, "query_batch_size": batch, **mining},
        }
    )


def _brute_force(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


def _neighbour_rows(layout: RunLayout, ids: list[str]) -> dict[int, tuple[list[int], np.ndarray, list[int]]]:
    got = pq.read_table(layout.neighbours("e")).to_pandas()
    index = {v: i for i, v in enumerate(ids)}
    out = {}
    for q, rows in got.groupby("q_id"):
        rows = rows.sort_values("rank")
        out[index[q]] = ([index[t] for t in rows.t_id], rows.sim.to_numpy(), list(rows["rank"]))
    return out


def _recall(layout: RunLayout, ids: list[str], truth: np.ndarray) -> float:
    got = _neighbour_rows(layout, ids)
    hits = sum(len(set(got.get(q, ([],))[0]) & set(truth[q])) for q in range(len(truth)))
    return hits / truth.size


SHARDING = {
    "one_shard": {},
    "sharded": {"shard_rows": 64},  # five database shards
    "sharded_tasks": {"shard_rows": 97, "queries_per_task": 70},  # and five query work items
}


@pytest.mark.parametrize("sharding", SHARDING)
@pytest.mark.parametrize("data", ["random", "clustered"])
def test_exact_equals_numpy_brute_force(tmp_path, data, sharding):
    vectors = _unit(np.random.default_rng(1).normal(size=(300, 24))) if data == "random" else _clustered(300, 24, 2)
    layout = RunLayout(tmp_path)
    ids = _write_embeddings(layout, "e", vectors)
    stats = mine_candidates(_cfg(k=7, batch=50, **SHARDING[sharding]), "e", layout)
    assert stats["index"] == "IndexFlatIP"
    assert stats["index_plan"]["n_shards"] == {"one_shard": 1, "sharded": 5, "sharded_tasks": 4}[sharding]

    true_sims, true_rows = _brute_force(vectors, 7)
    sims = vectors @ vectors.T
    got = _neighbour_rows(layout, ids)
    assert len(got) == len(vectors)
    for q, (t_rows, t_sims, ranks) in got.items():
        assert ranks == list(range(1, 8))
        np.testing.assert_allclose(t_sims, true_sims[q], atol=1e-5)
        # Same neighbours up to ties: every returned neighbour's true sim matches its reported sim.
        np.testing.assert_allclose(sims[q, t_rows], t_sims, atol=1e-5)
        assert q not in t_rows
        if data == "random":  # no ties: exactly the brute-force neighbours, in order
            assert t_rows == list(true_rows[q])


def test_sharded_search_merges_to_the_unsharded_result(tmp_path):
    vectors = _clustered(500, 16, 5)
    path = tmp_path / "vectors.npy"
    np.save(path, vectors)
    file = VectorFile(path)
    plan = choose_index(_cfg(k=9).mining, 500, 16)
    whole = np.concatenate([i for _, _, i in FlatSearcher(file, plan, Device("cpu"), 64).search(0, 500)])
    # Shards of 37 rows, query blocks of 45 rows holding their running top-k, batches of 16.
    sharded_plan = dataclasses.replace(plan, shard_rows=37, block_rows=45)
    parts = list(FlatSearcher(file, sharded_plan, Device("cpu"), 16).search(0, 500))
    assert [first for first, _, _ in parts][:4] == [0, 16, 32, 45]
    sims = np.concatenate([s for _, s, _ in parts])
    rows = np.concatenate([i for _, _, i in parts])
    true_sims = np.sort(vectors @ vectors.T, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(sims, true_sims, atol=1e-5)
    assert (rows == whole).mean() > 0.99  # identical up to ties


@pytest.mark.parametrize("index", ["ivf_flat", "ivf_pq"])
def test_approximate_mode_reaches_its_recall_target(tmp_path, index):
    vectors = _clustered(3000, 32, 6, noise=0.25)
    layout = RunLayout(tmp_path)
    ids = _write_embeddings(layout, "e", vectors)
    cfg = _cfg(k=10, batch=512, index=index, recall_target=0.9, calibration_queries=600, nlist=64)
    stats = mine_candidates(cfg, "e", layout)
    plan = stats["index_plan"]
    assert plan["kind"] == index and plan["nlist"] == 64
    assert 1 <= plan["nprobe"] < 64  # really approximate: far fewer lists than all
    assert plan["recall"] >= 0.9 and plan["calibration_queries"] == 600
    assert _recall(layout, ids, _brute_force(vectors, 10)[1]) >= 0.9
    # Whatever the index, reported sims are exact inner products (IVF-PQ re-ranks its shortlist).
    neigh = pq.read_table(layout.neighbours("e")).to_pandas().sample(300, random_state=0)
    q = [int(v, 16) for v in neigh.q_id]
    t = [int(v, 16) for v in neigh.t_id]
    np.testing.assert_allclose(np.einsum("nd,nd->n", vectors[q], vectors[t]), neigh.sim, atol=1e-5)


def test_auto_index_choice_follows_size_and_budget():
    mining = _cfg(exact_max_vectors=1000, memory_budget="4GB").mining
    assert choose_index(mining, 1000, 64).kind == "flat"
    ivf = choose_index(mining, 200_000, 64)
    assert ivf.kind == "ivf_flat" and ivf.nlist == 512 and ivf.train_size == 64 * 512
    # 2M x 768 float32 is 6 GB: more than the budget, so product quantisation with re-ranking.
    pq_plan = choose_index(mining, 2_000_000, 768)
    assert pq_plan.kind == "ivf_pq" and pq_plan.pq_m == 96 and pq_plan.shortlist == 4 * 11
    # Exact above the budget is sharded; each shard fits what the budget leaves.
    flat = choose_index(_cfg(index="flat", memory_budget="1GB").mining, 2_000_000, 768)
    assert flat.n_shards > 1 and flat.shard_rows * 768 * 4 < 10**9
    assert flat.block_rows >= 64
    with pytest.raises(MiningResourceError, match="memory_budget"):
        choose_index(_cfg(memory_budget="50MB").mining, 2_000_000, 768)
    with pytest.raises(MiningResourceError, match="pq_m"):
        choose_index(_cfg(index="ivf_pq", pq_m=7).mining, 10_000, 64)


def test_mining_keys_are_validated_with_one_line_errors():
    with pytest.raises(ConfigError, match=r"mining\.memory_budget: 'lots' is not a memory size"):
        _cfg(memory_budget="lots")
    with pytest.raises(ConfigError, match=r"nprobe \(9\) must be <= nlist \(8\)"):
        _cfg(nlist=8, nprobe=9)
    with pytest.raises(ConfigError, match=r"mining\.index"):
        _cfg(index="hnsw")
    with pytest.raises(ConfigError, match=r"mining\.recall_target"):
        _cfg(recall_target=1.5)
    assert _cfg(memory_budget="1.5GiB").mining.memory_budget == "1.5GiB"


def test_device_resolution_without_gpu():
    assert resolve_device(_cfg(device="auto").mining) == Device("cpu")
    with pytest.raises(MiningResourceError, match="faiss-gpu-cu12"):
        resolve_device(_cfg(device="cuda").mining)


@pytest.fixture
def fake_gpu_faiss(monkeypatch):
    """FAISS's GPU API with CPU objects behind it, so the GPU code path runs here (there is no
    GPU on the build machines): resources, per-GPU flat shards, the multi-GPU cloner, and the
    parameter space. Records what the mining code asked for."""
    import faiss

    calls = types.SimpleNamespace(flat=[], cloned=[])

    class GpuIndexFlatConfig:
        device, useFloat16 = 0, False

    def gpu_index_flat_ip(res, dim, cfg):
        calls.flat.append((cfg.device, cfg.useFloat16))
        return faiss.IndexFlatIP(dim)

    class GpuMultipleClonerOptions:
        shard, useFloat16 = False, False

    def index_cpu_to_gpus_list(index, co=None, gpus=None, ngpu=-1):
        calls.cloned.append((co.shard, co.useFloat16, list(gpus)))
        return faiss.clone_index(index)

    for name, value in {
        "StandardGpuResources": lambda: object(),
        "GpuIndexFlatConfig": GpuIndexFlatConfig,
        "GpuIndexFlatIP": gpu_index_flat_ip,
        "GpuMultipleClonerOptions": GpuMultipleClonerOptions,
        "index_cpu_to_gpus_list": index_cpu_to_gpus_list,
        "index_gpu_to_cpu": lambda index: faiss.clone_index(index),
        "GpuParameterSpace": faiss.ParameterSpace,
        "get_num_gpus": lambda: 2,
    }.items():
        monkeypatch.setattr(faiss, name, value, raising=False)
    return calls


@pytest.mark.parametrize("index", ["flat", "ivf_flat"])
def test_gpu_path_matches_cpu(tmp_path, fake_gpu_faiss, index):
    vectors = _clustered(600, 16, 8)
    results = {}
    for device in ("cpu", "cuda"):
        layout = RunLayout(tmp_path / device)
        _write_embeddings(layout, "e", vectors)
        cfg = _cfg(k=6, band=(0.3, 0.99), index=index, device=device, gpu_float16=True, nlist=16, nprobe=4,
                   calibration_queries=100)
        stats = mine_candidates(cfg, "e", layout)
        assert stats["devices"] == [device]
        results[device] = pq.read_table(layout.neighbours("e")).to_pandas()
    pd_cpu, pd_gpu = (results[d].sort_values(["q_id", "rank"]).reset_index(drop=True) for d in ("cpu", "cuda"))
    np.testing.assert_allclose(pd_cpu.sim, pd_gpu.sim, atol=1e-5)
    assert (pd_cpu.t_id == pd_gpu.t_id).mean() > 0.99
    if index == "flat":  # the shard is split over both GPUs, stored as float16 when asked
        assert fake_gpu_faiss.flat == [(0, True), (1, True)]
    else:  # the trained IVF index is cloned onto both GPUs, sharded
        assert (True, True, [0, 1]) in fake_gpu_faiss.cloned


def test_work_items_run_in_any_order_and_merge(tmp_path):
    vectors = _clustered(400, 16, 9)
    reference = RunLayout(tmp_path / "reference")
    _write_embeddings(reference, "e", vectors)
    cfg = _cfg(band=(0.5, 0.95), k=8, queries_per_task=90)
    expected = mine_candidates(cfg, "e", reference)

    layout = RunLayout(tmp_path / "mapped")
    _write_embeddings(layout, "e", vectors)
    items = plan_mining_work(cfg, layout, "e")
    assert items[0] == {"id": "q000000000000-000000000080", "encoder": "e", "query_start": 0, "query_stop": 80}
    assert len(items) == 5 and items[-1]["query_stop"] == 400
    assert json.loads(json.dumps(items)) == items  # small and JSON-able, for XCom
    for item in reversed(items[1:]):
        assert not run_mining_work(cfg, layout, item).get("skipped")
    with pytest.raises(ItemsNotDone, match="not done: q000000000000-000000000080"):
        finalize_mining(cfg, layout, "e")
    run_mining_work(cfg, layout, items[0])
    assert run_mining_work(cfg, layout, items[0])["skipped"]
    stats = finalize_mining(cfg, layout, "e")
    for key in ("queries", "neighbours", "candidates", "queries_with_candidates", "sim_histogram_0_1_by_0_05"):
        assert stats[key] == expected[key]
    for kind in ("candidates", "neighbours"):
        got = pq.read_table(getattr(layout, kind)("e")).to_pandas()
        want = pq.read_table(getattr(reference, kind)("e")).to_pandas()
        cols = ["q_id", "rank"]
        assert got.sort_values(cols).reset_index(drop=True).equals(want.sort_values(cols).reset_index(drop=True))
    # Finalizing again (a retried task) gives the same stats and outputs; committed items are skipped.
    assert finalize_mining(cfg, layout, "e") == stats
    assert all(run_mining_work(cfg, layout, item)["skipped"] for item in items)


def test_changed_inputs_never_reuse_parts(tmp_path):
    layout = RunLayout(tmp_path)
    _write_embeddings(layout, "e", _clustered(200, 8, 10))
    cfg = _cfg(band=(0.5, 0.99), k=5, queries_per_task=50)
    items = plan_mining_work(cfg, layout, "e")
    for item in items:
        run_mining_work(cfg, layout, item)
    first = finalize_mining(cfg, layout, "e")
    work = layout.work_dir("mine-e")
    old_plan = json.loads((work / "plan.json").read_text())
    np.save(layout.embedding_vectors("e"), _clustered(200, 8, 11))
    os.utime(layout.embedding_vectors("e"), ns=(1, 1))  # a different file, even on a coarse clock
    plan_mining_work(cfg, layout, "e")
    new_plan = json.loads((work / "plan.json").read_text())
    assert new_plan["fingerprint"] != old_plan["fingerprint"]
    assert not list((work / "items").glob("*.json")) and not (work / "parts").exists()  # nothing stale kept
    second = mine_candidates(cfg, "e", layout)
    assert second["sim_histogram_0_1_by_0_05"] != first["sim_histogram_0_1_by_0_05"]


def test_killed_mining_resumes_without_redoing_finished_items(tmp_path):
    vectors = _clustered(300, 16, 12)
    cfg_data = {"encoders": [{"name": "e", "kind": "classic_color_layout", "band": [0.5, 0.95]}],
                "mining": {"k": 6, "queries_per_task": 60}}
    cfg = parse_config(cfg_data)
    reference = RunLayout(tmp_path / "reference")
    _write_embeddings(reference, "e", vectors)
    mine_candidates(cfg, "e", reference)

    layout = RunLayout(tmp_path / "killed")
    _write_embeddings(layout, "e", vectors)
    # The child dies by SIGKILL right after its second work item is recorded as done.
    script = textwrap.dedent(f"""
        import os, signal
        from megapairs_ops.stages.mine import work as mine
        from megapairs_ops.config import parse_config
        from megapairs_ops.layout import RunLayout
        from megapairs_ops.storage import WorkDir
        done = []
        commit = WorkDir.commit
        def commit_then_die(self, item_id, stats):
            commit(self, item_id, stats)
            done.append(item_id)
            if len(done) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        WorkDir.commit = commit_then_die
        mine.mine_candidates(parse_config({cfg_data!r}), "e", RunLayout({str(layout.root)!r}))
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    finished = sorted((layout.work_dir("mine-e") / "items").glob("q*.json"))
    assert len(finished) == 2 and not layout.candidates("e").exists()
    stamps = [p.stat().st_mtime_ns for p in finished]

    items = plan_mining_work(cfg, layout, "e")
    redone = [item for item in items if not run_mining_work(cfg, layout, item).get("skipped")]
    assert len(redone) == 3
    assert [p.stat().st_mtime_ns for p in finished] == stamps
    finalize_mining(cfg, layout, "e")
    for kind in ("candidates", "neighbours"):
        assert pq.read_table(getattr(layout, kind)("e")).equals(pq.read_table(getattr(reference, kind)("e")))


def test_band_and_cap(tmp_path):
    vectors = _clustered(400, 16, 3)
    layout = RunLayout(tmp_path)
    _write_embeddings(layout, "e", vectors)
    stats = mine_candidates(_cfg(band=(0.5, 0.9), k=10, cap=2), "e", layout)
    cand = pq.read_table(layout.candidates("e")).to_pandas()
    neigh = pq.read_table(layout.neighbours("e")).to_pandas()
    assert stats["candidates"] == len(cand) > 0
    assert stats["neighbours"] == len(neigh) == 400 * 10
    assert ((cand.sim > 0.5) & (cand.sim < 0.9)).all()
    assert cand.groupby("q_id").size().max() <= 2
    assert (cand.q_id != cand.t_id).all()
    assert not cand.duplicated(["q_id", "t_id"]).any()
    # The cap keeps each query's most similar in-band neighbours, after taking the top k.
    in_band = neigh[(neigh.sim > 0.5) & (neigh.sim < 0.9)].sort_values(["q_id", "rank"])
    expected = in_band.groupby("q_id").head(2)
    assert set(zip(expected.q_id, expected.t_id)) == set(zip(cand.q_id, cand.t_id))
    assert stats["queries_with_candidates"] == cand.q_id.nunique()


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
    neigh = pq.read_table(layout.neighbours("e")).to_pandas()
    assert (neigh.q_id != neigh.t_id).all()  # the copy is a neighbour, the query itself never


def test_tiny_corpus_and_mismatch(tmp_path):
    layout = RunLayout(tmp_path)
    _write_embeddings(layout, "e", _unit(np.ones((1, 4))))
    assert mine_candidates(_cfg(k=3), "e", layout)["candidates"] == 0
    pq.write_table(pa.table({"image_id": ["a", "b"]}), layout.embedding_ids("e"))
    with pytest.raises(ValueError, match="inconsistent"):
        mine_candidates(_cfg(k=3), "e", layout)


# ---------------------------------------------------------------------------------------------
# Incremental mining: a grown corpus reuses an earlier run's exact neighbours.


def _write_run(layout: RunLayout, ids: list[str], vectors: np.ndarray) -> None:
    layout.embedding_dir("e").mkdir(parents=True)
    np.save(layout.embedding_vectors("e"), vectors.astype(np.float32))
    pq.write_table(pa.table({"image_id": ids}), layout.embedding_ids("e"))


def _publish(layout: RunLayout, when: str = "2026-01-01T00:00:00Z") -> None:
    """What catalogue.record_version leaves behind: the run is a dataset version."""
    (layout.root / "manifest.json").write_text(json.dumps({"version": layout.root.name, "published_at": when}))


def _mine_mapped(cfg, layout: RunLayout) -> dict:
    """The Airflow way: plan, the items in reverse order, a re-plan (finds them done), finalize."""
    items = plan_mining_work(cfg, layout, "e")
    for item in reversed(items):
        assert not run_mining_work(cfg, layout, item).get("skipped")
    assert plan_mining_work(cfg, layout, "e") == items
    assert all(run_mining_work(cfg, layout, item)["skipped"] for item in items)
    return finalize_mining(cfg, layout, "e")


def _assert_same_outputs(got: RunLayout, want: RunLayout) -> None:
    """Row for row (query order, then rank); sims to float precision."""
    for kind in ("neighbours", "candidates"):
        a = pq.read_table(getattr(got, kind)("e")).to_pandas()
        b = pq.read_table(getattr(want, kind)("e")).to_pandas()
        assert len(a) == len(b) > 0, kind
        assert a.q_id.tolist() == b.q_id.tolist(), kind
        assert a.t_id.tolist() == b.t_id.tolist(), kind
        assert a["rank"].tolist() == b["rank"].tolist(), kind
        np.testing.assert_allclose(a.sim, b.sim, atol=1e-6)


def _grown(seed: int, n_old: int = 300, n_new: int = 30, d: int = 24):
    """v1's ids and vectors, and v2's: v1's images plus n_new new ones, in another row order."""
    rng = np.random.default_rng(seed)
    vectors = _unit(rng.normal(size=(n_old + n_new, d)))
    ids = [f"{int(v):016x}" for v in rng.choice(2**40, size=n_old + n_new, replace=False)]
    order = rng.permutation(n_old + n_new)  # new images land between old ones
    return (ids[:n_old], vectors[:n_old]), ([ids[i] for i in order], vectors[order])


INCREMENTAL_SHARDING = {
    "one_shard": {"batch": 50},
    "sharded_tasks": {"batch": 16, "shard_rows": 70, "queries_per_task": 80},  # five shards, five items
}


@pytest.mark.parametrize("sharding", INCREMENTAL_SHARDING)
def test_incremental_mining_equals_a_full_recompute(tmp_path, sharding):
    (ids1, vec1), (ids2, vec2) = _grown(21)
    cfg = _cfg(band=(0.3, 0.9), k=8, cap=3, **INCREMENTAL_SHARDING[sharding])
    v1, v2 = RunLayout(tmp_path / "runs" / "v1"), RunLayout(tmp_path / "runs" / "v2")
    _write_run(v1, ids1, vec1)
    first = mine_candidates(cfg, "e", v1)
    assert first["mode"] == "full" and "no published version" in first["mode_reason"]
    assert "incremental" not in first
    _publish(v1)

    _write_run(v2, ids2, vec2)
    stats = _mine_mapped(cfg, v2)
    assert stats["mode"] == "incremental" and "v1" in stats["mode_reason"]
    assert stats["incremental"] == {
        "parent": "v1", "parent_run_dir": str(v1.root), "queries_from_parent": 300, "new_queries": 30,
        "changed_vectors": 0, "remined_queries": 0, "queries_searched_in_full": 30,
        "old_queries_searched_against_new": 300, "new_rows": 30, "removed_images": 0,
    }
    assert stats["queries"] == 330 and stats["work_items"] == (1 if sharding == "one_shard" else 5)

    full = RunLayout(tmp_path / "elsewhere" / "v2")  # no parent beside it: mined in full
    _write_run(full, ids2, vec2)
    expected = mine_candidates(cfg, "e", full)
    assert expected["mode"] == "full"
    _assert_same_outputs(v2, full)
    for key in ("queries", "neighbours", "candidates", "queries_with_candidates", "sim_histogram_0_1_by_0_05"):
        assert stats[key] == expected[key], key
    # Brute force agrees too: v2's neighbours are the exact top k of v2's corpus.
    got = _neighbour_rows(v2, ids2)
    truth = _brute_force(vec2, 8)[1]
    assert all(got[q][0] == list(truth[q]) for q in range(len(ids2)))


def test_incremental_remines_queries_that_lost_a_neighbour(tmp_path):
    """Removed images and a changed vector: the queries whose parent list held one of them are
    searched in full again, everything else merges; still equal to a full recompute."""
    (ids1, vec1), (ids2, vec2) = _grown(22, n_old=300, n_new=25)
    cfg = _cfg(band=(0.3, 0.9), k=6, cap=2, queries_per_task=100)
    v1, v2 = RunLayout(tmp_path / "runs" / "v1"), RunLayout(tmp_path / "runs" / "v2")
    _write_run(v1, ids1, vec1)
    mine_candidates(cfg, "e", v1)
    _publish(v1)
    neigh1 = pq.read_table(v1.neighbours("e")).to_pandas()

    removed = set(ids1[:4])
    keep = [i for i, v in enumerate(ids2) if v not in removed]
    ids2, vec2 = [ids2[i] for i in keep], vec2[keep].copy()
    changed = ids2.index(ids1[10])  # e.g. its caption was edited: same image id, another vector
    vec2[changed] = _unit(np.random.default_rng(5).normal(size=(1, vec2.shape[1])))[0]
    _write_run(v2, ids2, vec2)
    stats = mine_candidates(cfg, "e", v2)
    assert stats["mode"] == "incremental"
    inc = stats["incremental"]
    lost = set(neigh1[neigh1.t_id.isin(removed | {ids1[10]})].q_id) - removed - {ids1[10]}
    assert inc["removed_images"] == 4 and inc["changed_vectors"] == 1 and inc["new_queries"] == 25
    assert inc["remined_queries"] == len(lost) > 0
    assert inc["queries_from_parent"] == 300 - 4 - 1 - len(lost)
    assert inc["queries_searched_in_full"] == len(ids2) - inc["queries_from_parent"]

    full = RunLayout(tmp_path / "elsewhere" / "v2")
    _write_run(full, ids2, vec2)
    mine_candidates(cfg, "e", full)
    _assert_same_outputs(v2, full)


def test_unchanged_corpus_reuses_everything(tmp_path):
    (ids1, vec1), _ = _grown(23)
    cfg = _cfg(band=(0.3, 0.9), k=5)
    runs = [RunLayout(tmp_path / "runs" / name) for name in ("a", "b")]
    for layout in runs:
        _write_run(layout, ids1, vec1)
    mine_candidates(cfg, "e", runs[0])
    _publish(runs[0])
    stats = mine_candidates(cfg, "e", runs[1])
    assert stats["incremental"]["queries_from_parent"] == 300
    assert stats["incremental"]["old_queries_searched_against_new"] == 0
    assert stats["incremental"]["queries_searched_in_full"] == 0
    _assert_same_outputs(runs[1], runs[0])


FALLBACKS = {
    "other_k": ({"k": 7}, "k=5"),
    "ivf": ({"index": "ivf_flat", "nlist": 8, "nprobe": 8, "calibration_queries": 0}, "approximate"),
    "switched_off": ({"incremental": False}, "mining.incremental is off"),
    "other_vectors": ({}, "no image shares an identical"),
    "parent_changed": ({}, "changed since it was mined"),
    "parent_unpublished": ({}, "no published version"),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_incremental_falls_back_to_full_mining(tmp_path, case):
    (ids1, vec1), (ids2, vec2) = _grown(24)
    v1, v2 = RunLayout(tmp_path / "runs" / "v1"), RunLayout(tmp_path / "runs" / "v2")
    _write_run(v1, ids1, vec1)
    mine_candidates(_cfg(band=(0.3, 0.9), k=5), "e", v1)
    if case != "parent_unpublished":
        _publish(v1)
    if case == "other_vectors":
        vec2 = _unit(vec2 + 0.01)
    if case == "parent_changed":
        np.save(v1.embedding_vectors("e"), vec1[::-1].copy())  # re-embedded after mining
        os.utime(v1.embedding_vectors("e"), ns=(1, 1))
    _write_run(v2, ids2, vec2)
    update, reason = FALLBACKS[case]
    cfg = _cfg(band=(0.3, 0.9), **{"k": 5, **update})
    stats = mine_candidates(cfg, "e", v2)
    assert stats["mode"] == "full" and "incremental" not in stats
    assert reason in stats["mode_reason"]
    if case != "ivf":  # the approximate index is compared with brute force elsewhere
        full = RunLayout(tmp_path / "elsewhere" / "v2")
        _write_run(full, ids2, vec2)
        mine_candidates(cfg, "e", full)
        _assert_same_outputs(v2, full)


def test_stale_incremental_parts_are_never_merged(tmp_path):
    """Parts of an incremental plan carry its id: a later decision (here: full mining, after the
    parent went away) ignores and removes them, and its own items must run."""
    (ids1, vec1), (ids2, vec2) = _grown(25)
    cfg = _cfg(band=(0.3, 0.9), k=5, queries_per_task=110)
    v1, v2 = RunLayout(tmp_path / "runs" / "v1"), RunLayout(tmp_path / "runs" / "v2")
    _write_run(v1, ids1, vec1)
    mine_candidates(cfg, "e", v1)
    _publish(v1)
    _write_run(v2, ids2, vec2)
    items = plan_mining_work(cfg, v2, "e")
    for item in items:
        run_mining_work(cfg, v2, item)
    work_dir = v2.work_dir("mine-e")
    assert json.loads((work_dir / "plan.json").read_text())["mode"]["mode"] == "incremental"
    assert len(list((work_dir / "items").glob("q*.json"))) == 3 and list(work_dir.glob("inc-*"))

    (work_dir / "plan.json").unlink()  # the decision is taken again ...
    shutil.rmtree(v1.root)  # ... and the parent is gone
    assert plan_mining_work(cfg, v2, "e") == items
    assert json.loads((work_dir / "plan.json").read_text())["mode"]["mode"] == "full"
    assert not list(work_dir.glob("inc-*")) and not (work_dir / "items").exists()
    with pytest.raises(ItemsNotDone, match="not done"):
        finalize_mining(cfg, v2, "e")
    stats = _mine_mapped(cfg, v2)
    assert stats["mode"] == "full"
    full = RunLayout(tmp_path / "elsewhere" / "v2")
    _write_run(full, ids2, vec2)
    mine_candidates(cfg, "e", full)
    _assert_same_outputs(v2, full)


def test_parent_is_the_newest_published_version(tmp_path):
    """v3 grows v2 which grew v1: v2 (published last) is the parent; a scratch run beside them with
    exactly v3's corpus is no dataset version and is ignored."""
    rng = np.random.default_rng(26)
    ids = [f"{int(v):016x}" for v in rng.choice(2**40, size=360, replace=False)]
    vectors = _unit(rng.normal(size=(360, 16)))
    cfg = _cfg(band=(0.3, 0.9), k=5)
    root = tmp_path / "runs"
    for name, n, when in (("v1", 300, "2026-01-01T00:00:00Z"), ("v2", 330, "2026-01-08T00:00:00Z"),
                          ("scratch", 360, None)):
        layout = RunLayout(root / name)
        _write_run(layout, ids[:n], vectors[:n])
        mine_candidates(cfg, "e", layout)
        if when:
            _publish(layout, when)
    v3 = RunLayout(root / "v3")
    _write_run(v3, ids, vectors)
    stats = mine_candidates(cfg, "e", v3)
    assert stats["incremental"]["parent"] == "v2"
    assert (stats["incremental"]["queries_from_parent"], stats["incremental"]["new_queries"]) == (330, 30)
    _assert_same_outputs(v3, RunLayout(root / "scratch"))


def test_merged_lists_order_ties_by_descending_row():
    parent = (np.array([[0.9, 0.5, -np.inf]], np.float32), np.array([[4, 7, -1]]))
    new = (np.array([[0.5, 0.5, 0.1]], np.float32), np.array([[9, 2, 3]]))
    sims, rows = merge_topk_by_row(*parent, *new, 4)
    assert rows.tolist() == [[4, 9, 7, 2]] and sims.tolist() == [[pytest.approx(0.9), 0.5, 0.5, 0.5]]
    sims, rows = merge_topk_by_row(*parent, new[0][:, :0], new[1][:, :0], 3)
    assert rows.tolist() == [[4, 7, -1]]  # a short list keeps its padding last


def test_incremental_key_is_validated():
    assert _cfg().mining.incremental is True
    with pytest.raises(ConfigError, match=r"mining\.incremental"):
        _cfg(incremental="sometimes")
