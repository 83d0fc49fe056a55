"""The curator report of a real (small) run: every section carries the run's own numbers, it
links only to files beside it, it compares with the previous run, it explains a run that did not
publish, and a run whose instructions collapse to one template fails its gate and ships nothing."""

from __future__ import annotations

import html
import re
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from megapairs_ops import pipeline
from megapairs_ops.cli import main
from megapairs_ops.config import load_config
from megapairs_ops.layout import RunLayout
from megapairs_ops.quality.gates import ValidationFailed, load_gate_results
from megapairs_ops.report import build_report, find_previous_run
from megapairs_ops.storage import load_status, read_json, write_json, write_parquet
from tests.fixtures.paths import REPO

DEMO = REPO / "configs" / "demo.yaml"
ENCODERS = ("visual_semantic", "visual_pattern", "caption")

pytestmark = pytest.mark.slow  # every test reads a real pipeline run


@pytest.fixture(scope="module")
def cfg():
    return load_config(DEMO)


@pytest.fixture(scope="module")
def runs(sample_corpus, tmp_path_factory):
    """One finished demo run on the sample corpus, in an output root of its own."""
    root = tmp_path_factory.mktemp("report_runs")
    assert main(["run", "--config", str(DEMO), "--corpus", str(sample_corpus), "--out", str(root / "a")]) == 0
    return root


@pytest.fixture(scope="module")
def built(runs, cfg):
    layout = RunLayout(runs / "a")
    result = build_report(cfg, layout)
    return layout, result, (layout.reports_dir / "index.html").read_text(encoding="utf-8")


def section(page: str, key: str) -> str:
    match = re.search(rf'<section id="{key}">(.*?)</section>', page, re.S)
    assert match, f"section {key} missing"
    return match.group(1)


def text(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def copy_run(src: Path, dst: Path) -> RunLayout:
    shutil.copytree(src, dst)
    return RunLayout(dst)


def test_every_section_shows_the_runs_own_numbers(built, cfg):
    layout, result, page = built
    stats = read_json(layout.stats)
    triplets = pq.read_table(layout.triplets_dir)
    assert result["state"] == "published" and result["report"] == str(layout.reports_dir / "index.html")

    overview = text(section(page, "overview"))
    assert f"{stats['images_in']:,}" in overview and f"{triplets.num_rows:,}" in overview

    gates = text(section(page, "gates"))
    for gate in ("quarantine_rate", "duplicate_rate", "mean_instructions", "instruction_share",
                 "opening_share", "distinct_2gram_ratio", "failure_rate", *(f"encoder_share_{e}" for e in ENCODERS)):
        assert gate in gates, gate
    assert 'href="data_docs/index.html"' in section(page, "gates")
    assert (layout.reports_dir / "data_docs" / "index.html").is_file()

    funnel = text(section(page, "funnel"))
    for enc in ENCODERS:
        assert f"candidates · {enc}" in funnel
        assert f"{pq.read_metadata(layout.candidates(enc)).num_rows:,}" in funnel
    assert f"{pq.read_metadata(layout.pairs).num_rows:,}" in funnel

    similarity = section(page, "similarity")
    assert similarity.count("<svg") == len(ENCODERS) and similarity.count("band (0.8, 0.96)") == len(ENCODERS)
    neighbours = pq.read_metadata(layout.neighbours(ENCODERS[0])).num_rows
    assert f"retrieved neighbours ({neighbours:,})" in text(similarity)

    combos = Counter(" + ".join(e) for e in pq.read_table(layout.pairs)["encoders"].to_pylist())
    overlap = text(section(page, "overlap"))
    assert len(combos) > 3
    for combo, n in combos.items():
        assert f"{combo} {n:,} " in overlap, combo

    instructions = text(section(page, "instructions"))
    top = read_json(layout.report_summary)["instructions"]
    assert f"{top['vocabulary']:,}" in instructions and "distinct-2" in instructions
    n_instructions = sum(len(x) for x in triplets["q_text"].to_pylist())
    assert f"{n_instructions:,}" in instructions

    gallery = section(page, "gallery")
    cards = gallery.count('<article class="triplet">')
    assert cards == cfg.curation.gallery_per_encoder * len(ENCODERS) == result["gallery"]
    assert gallery.count("<details>") == cards
    published_ids = set(triplets["pair_id"].to_pylist())
    assert set(re.findall(r"pair <code>([0-9a-f]{16})</code>", gallery)) <= published_ids
    for src in re.findall(r'<img[^>]+src="([^"]+)"', page):
        assert (layout.reports_dir / src).is_file(), src

    assert "curation.rejects_file" in text(section(page, "curation"))
    assert "No previous run" in text(section(page, "comparison"))


def test_the_page_loads_nothing_from_a_network(built):
    _, _, page = built
    urls = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert urls and not [u for u in urls if re.match(r"^[a-z]+://", u) or u.startswith("//")]
    assert "<script" not in page
    assert "url(" not in page  # no CSS-fetched fonts or images


def test_summary_is_what_the_gates_judged(built):
    layout, _, _ = built
    summary = read_json(layout.report_summary)
    judged = {g["gate"]: g for s in load_gate_results(layout) for g in s["gates"]}
    assert summary["instructions"]["instruction_share"] == pytest.approx(judged["instruction_share"]["observed"])
    assert summary["instructions"]["distinct_2"] == pytest.approx(judged["distinct_2gram_ratio"]["observed"])
    assert summary["published"] == read_json(layout.stats)["triplets"]
    assert summary["gates"]["fail"] == 0 and summary["gates"]["pass"] >= 10


def test_compares_with_the_previous_run_beside_it(runs, cfg, built):
    layout = copy_run(runs / "a", runs / "b")
    assert find_previous_run(cfg, layout).root == (runs / "a").resolve()
    build_report(cfg, layout)
    comparison = text(section((layout.reports_dir / "index.html").read_text(), "comparison"))
    assert str((runs / "a").resolve()) in comparison
    assert "published triplets" in comparison and "±0" in comparison

    none = cfg.model_copy(update={"curation": cfg.curation.model_copy(update={"compare_with": None})})
    assert find_previous_run(none, layout) is None

    # The parent dataset version named in the manifest wins over the latest sibling.
    (runs / "parent").mkdir()
    manifest = read_json(layout.root / "manifest.json")
    write_json(dict(manifest, version="b", parent="parent"), layout.root / "manifest.json")
    assert find_previous_run(cfg, layout).root == (runs / "parent").resolve()
    for name in ("b", "parent"):
        shutil.rmtree(runs / name)


def test_cli_rebuilds_the_report_from_the_recorded_config(built, runs, capsys):
    layout, _, _ = built
    index = layout.reports_dir / "index.html"
    index.unlink()
    assert main(["report", str(layout.root)]) == 0
    assert index.is_file() and '"state": "published"' in capsys.readouterr().out
    assert main(["report", str(layout.root), "--previous", str(layout.root)]) == 0
    assert "this run" in text(section(index.read_text(), "comparison"))
    assert main(["report", str(runs / "nowhere")]) == 2


def test_report_of_an_unfinished_run_says_what_is_missing(runs, cfg, tmp_path):
    layout = copy_run(runs / "a", tmp_path / "unfinished")
    for path in (layout.triplets_dir, layout.root / "annotations"):
        shutil.rmtree(path)
    for path in (layout.annotations, layout.status("annotate"), layout.status("publish"), layout.triplets_jsonl):
        path.unlink()
    result = build_report(cfg, layout)
    page = (layout.reports_dir / "index.html").read_text()
    assert result["state"] == "none" and result["gallery"] == 0
    assert "Not published yet" in page
    assert "Not available" in section(page, "gallery") and "Not available" in section(page, "instructions")
    assert "<svg" in section(page, "similarity")  # what did finish is still shown


def test_an_image_that_cannot_be_read_gets_a_placeholder(runs, cfg, tmp_path, monkeypatch):
    import megapairs_ops.media as media

    layout = copy_run(runs / "a", tmp_path / "moved")
    real = media.read_image_bytes
    broken: list[str] = []

    def flaky(ref: str) -> bytes:
        if not broken:
            broken.append(ref)
        if ref == broken[0]:
            raise FileNotFoundError(ref)
        return real(ref)

    monkeypatch.setattr(media, "read_image_bytes", flaky)
    result = build_report(cfg, layout)
    page = (layout.reports_dir / "index.html").read_text()
    assert broken and 'aria-label="image unavailable"' in page
    assert result["thumbnails"] == len(list((layout.reports_dir / "thumbs").glob("*.jpg")))


def test_collapsed_instructions_fail_the_diversity_gate_and_nothing_publishes(runs, sample_corpus, cfg, tmp_path):
    layout = copy_run(runs / "a", tmp_path / "collapsed")
    layout.status("publish").unlink()
    # Test-only annotation override: the instruct model answers every pair with one template.
    annotations = pq.read_table(layout.annotations)
    same = ["Find a similar image.", "Show me another picture like this one.", "Retrieve a related photo."]
    annotations = annotations.set_column(
        annotations.schema.get_field_index("instructions"), "instructions",
        pa.array([same] * annotations.num_rows, annotations.schema.field("instructions").type))
    write_parquet(annotations, layout.annotations)
    assert annotations.num_rows >= cfg.gates.min_rows

    ctx = pipeline.context_from_params(DEMO, sample_corpus, layout.root)
    with pytest.raises(ValidationFailed, match="instruction_share") as err:
        pipeline.run_stage(ctx, "publish")
    assert err.value.result["failed_expectations"] == ["instruction_share"]
    assert "'Find a similar image.' in" in str(err.value)
    assert not layout.triplets_dir.exists() and not layout.triplets_jsonl.exists()
    assert load_status(layout, "publish") is None

    result = build_report(cfg, layout)
    page = (layout.reports_dir / "index.html").read_text()
    assert result["state"] == "withdrawn"
    assert "Not published" in page and "instruction_share" in text(re.search(r'<div class="banner fail">.*?</div>', page).group(0))
    gates = section(page, "gates")
    row = re.search(r"<tr><td>(.*?)</td><td><b>instruction_share</b>", gates).group(1)
    assert "fail" in row
    instructions = text(section(page, "instructions"))
    assert "Find a similar image." in instructions and "100.0%" in instructions


def test_rejected_ids_are_excluded_on_the_next_publish_and_counted(runs, sample_corpus, tmp_path):
    layout = copy_run(runs / "a", tmp_path / "curated")
    before = pq.read_table(layout.triplets_dir).to_pylist()
    pair, image = before[0]["pair_id"], before[1]["q_id"]
    rejects = tmp_path / "rejects.csv"
    rejects.write_text(f"kind,id,reason\npair,{pair},wrong object named\nimage,{image},watermark\n")
    config = tmp_path / "curated.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(DEMO.read_text()), "curation": {"rejects_file": str(rejects)}}))
    args = ["--config", str(config), "--corpus", str(sample_corpus), "--out", str(layout.root)]
    assert main(["stage", "publish", "--force", *args]) == 0

    after = pq.read_table(layout.triplets_dir).to_pylist()
    assert pair not in {r["pair_id"] for r in after}
    assert all(image not in (r["q_id"], r["t_id"]) for r in after)
    touching = {r["pair_id"] for r in before if image in (r["q_id"], r["t_id"])}
    assert len(after) == len(before) - len(touching | {pair})
    withheld = pq.read_table(layout.failures).filter(pa.compute.equal(pa.compute.field("stage"), "curation"))
    assert set(withheld["pair_id"].to_pylist()) == touching | {pair}
    curation = load_status(layout, "publish")["curation"]
    assert curation["excluded"] == len(touching | {pair})

    assert main(["report", str(layout.root)]) == 0
    page = (layout.reports_dir / "index.html").read_text()
    counted = text(section(page, "curation"))
    assert f"pairs withheld {len(touching | {pair})}" in counted
    assert "rejected_pair 1 wrong object named (rejects.csv line 2)" in counted
    assert f"withheld by curators: {len(touching | {pair})}" in text(section(page, "funnel"))
