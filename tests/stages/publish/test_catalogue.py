"""Dataset versions and the published-pairs catalogue across runs under one output root."""

import pyarrow.parquet as pq
import pytest

from megapairs_ops.cli import main
from megapairs_ops.config import load_config
from megapairs_ops.layout import RunLayout
from megapairs_ops.schemas import ANNOTATION_SCHEMA
from megapairs_ops.stages.publish.catalogue import catalogue_path, open_catalogue, reusable_annotations
from megapairs_ops.storage import read_json
from tests.fixtures.corpus import GROWN_NEW
from tests.fixtures.paths import DEMO


@pytest.fixture(scope="module")
def two_versions(sample_corpus, grown_sample_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("versions") / "runs"
    assert main(["run", "--config", DEMO, "--corpus", str(sample_corpus), "--out", str(out / "v1")]) == 0
    assert main(["run", "--config", DEMO, "--corpus", str(grown_sample_corpus), "--out", str(out / "v2")]) == 0
    return RunLayout(out / "v1"), RunLayout(out / "v2")


@pytest.mark.slow
def test_second_version_names_its_parent_and_counts_what_it_added(two_versions):
    v1, v2 = two_versions
    m1, m2 = read_json(v1.root / "manifest.json"), read_json(v2.root / "manifest.json")
    assert m1["parent"] is None and m1["added"] == m1["triplets"] > 0
    assert m2["parent"] == "v1" and m2["version"] == "v2"
    t1 = {r["pair_id"] for r in pq.read_table(v1.triplets_dir, columns=["pair_id"]).to_pylist()}
    t2 = {r["pair_id"] for r in pq.read_table(v2.triplets_dir, columns=["pair_id"]).to_pylist()}
    assert m2["added"] == len(t2 - t1) and m2["carried_over"] == len(t2 & t1) > 0
    assert m2["models"]["describe"] == "template:template-baseline-v1"
    assert m2["prompt_versions"] == ["v1"]


@pytest.mark.slow
def test_catalogue_offers_published_annotations_for_reuse(two_versions):
    v1, v2 = two_versions
    cfg = load_config(DEMO)
    assert catalogue_path(cfg, v2) == v2.root.parent / "catalogue.duckdb"
    reusable = reusable_annotations(cfg, v2, ANNOTATION_SCHEMA)
    # v2's pairs were all published (by v1 first, or by v2 itself): every one is reusable, with the
    # instructions of its first publication.
    first = {r["pair_id"]: r for r in pq.read_table(v2.triplets_dir).to_pylist()}
    first.update({r["pair_id"]: r for r in pq.read_table(v1.triplets_dir).to_pylist() if r["pair_id"] in first})
    rows = reusable.to_pylist()
    assert {r["pair_id"] for r in rows} == set(first)
    for row in rows:
        assert row["instructions"] == first[row["pair_id"]]["q_text"]
        assert row["description"] == first[row["pair_id"]]["description"]
    with open_catalogue(cfg, catalogue_path(cfg, v2)) as con:
        versions = con.execute("SELECT version, parent FROM versions ORDER BY published_at, version").fetchall()
        dup = con.execute("SELECT count(*) - count(DISTINCT pair_id) FROM published_pairs").fetchone()[0]
    assert versions == [("v1", None), ("v2", "v1")]
    assert dup == 0


@pytest.mark.slow
def test_republishing_a_version_keeps_its_lineage(two_versions, sample_corpus):
    v1, _ = two_versions
    before = read_json(v1.root / "manifest.json")
    assert main(["run", "--config", DEMO, "--corpus", str(sample_corpus), "--out", str(v1.root), "--force"]) == 0
    after = read_json(v1.root / "manifest.json")
    assert after["parent"] == before["parent"] and after["published_at"] == before["published_at"]
    assert after["triplets"] == before["triplets"] and after["added"] == before["added"]


@pytest.mark.slow
def test_grown_corpus_reannotates_nothing_already_published(two_versions):
    v1, v2 = two_versions
    ann = read_json(v2.status("annotate"))
    published_before = {r["pair_id"] for r in pq.read_table(v1.triplets_dir, columns=["pair_id"]).to_pylist()}
    v2_pairs = {r["pair_id"] for r in pq.read_table(v2.pairs, columns=["pair_id"]).to_pylist()}
    assert ann["reused"] == len(v2_pairs & published_before) > 0
    assert ann["pairs_annotated"] == len(v2_pairs - published_before)
    # The models were asked about the new pairs only (the template baseline answers first time).
    assert ann["requests"]["describe"] == ann["pairs_annotated"]
    assert read_json(v2.root / "manifest.json")["annotations_reused"] == ann["reused"]
    # Reused annotations are published verbatim.
    old = {r["pair_id"]: r["q_text"] for r in pq.read_table(v1.triplets_dir).to_pylist()}
    for row in pq.read_table(v2.triplets_dir).to_pylist():
        if row["pair_id"] in old:
            assert row["q_text"] == old[row["pair_id"]]


@pytest.mark.slow
def test_grown_corpus_embeds_only_the_new_images(two_versions):
    """v2 runs over the sample corpus plus 10% new images: every encoder computes exactly those
    and takes the rest from the content cache shared by the runs under one output root. (Only v2
    is read: another test re-runs v1 with --force, which then takes everything from the cache.)"""
    v1, v2 = two_versions
    n_old = pq.read_metadata(v1.images).num_rows
    assert n_old > 100 and pq.read_metadata(v2.images).num_rows == n_old + GROWN_NEW
    for enc in load_config(DEMO).encoders:
        second = read_json(v2.status(f"embed-{enc.name}"))
        assert (second["computed"], second["reused"], second["embedded"]) == (GROWN_NEW, n_old, n_old + GROWN_NEW), enc.name


@pytest.mark.slow
def test_grown_corpus_mines_only_against_the_new_images(two_versions):
    """New images are queries against the whole corpus; old queries keep v1's neighbours and are
    searched against the new images only."""
    v1, v2 = two_versions
    n_old = pq.read_metadata(v1.images).num_rows
    stages = read_json(v2.stats)["stages"]
    for enc in load_config(DEMO).encoders:
        mine = stages[f"mine-{enc.name}"]
        assert mine["mode"] == "incremental", mine["mode_reason"]
        inc = mine["incremental"]
        assert inc["parent"] == "v1" and inc["new_queries"] == GROWN_NEW
        assert inc["queries_from_parent"] == inc["old_queries_searched_against_new"] == n_old
        assert inc["removed_images"] == inc["changed_vectors"] == inc["remined_queries"] == 0


@pytest.mark.slow
def test_published_annotations_that_fail_todays_checks_are_asked_again(two_versions, grown_sample_corpus):
    """A stricter check (here: one more meta phrase) applies to annotations the catalogue offers
    for reuse too: what fails it is annotated anew, and never published again as it was."""
    import yaml

    v1, v2 = two_versions
    phrase = "different composition"  # in one of the template baseline's generic instructions
    old = [r for r in pq.read_table(v2.triplets_dir).to_pylist() if any(phrase in q for q in r["q_text"])]
    assert old, "the baseline should have used the phrase somewhere"
    data = yaml.safe_load(open(DEMO))
    data["annotate"]["checks"] = {"meta_phrases": [phrase]}
    data["gates"]["failure_rate"] = None
    config = v2.root.parent / "strict.yaml"
    config.write_text(yaml.safe_dump(data))
    v3 = RunLayout(v2.root.parent / "v3")
    assert main(["run", "--config", str(config), "--corpus", str(grown_sample_corpus), "--out", str(v3.root)]) == 0
    ann = read_json(v3.status("annotate"))
    assert ann["reuse_failed_checks"] == {"meta_language": len(old)}
    assert ann["pairs_annotated"] == len(old)
    published = pq.read_table(v3.triplets_dir).to_pylist()
    assert not [r for r in published if any(phrase in q for q in r["q_text"])]
    failed = {r["pair_id"]: r["reason"] for r in pq.read_table(v3.failures).to_pylist()}
    for row in old:  # re-asked: published with other instructions, or a failure with its reason
        assert row["pair_id"] in {r["pair_id"] for r in published} or failed[row["pair_id"]] == "meta_language"
