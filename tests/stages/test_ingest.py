import csv
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megapairs_ops.config import parse_config
from megapairs_ops.layout import RunLayout
from megapairs_ops.media import load_rgb, phash64, read_image_bytes
from megapairs_ops.schemas import IMAGES_SCHEMA, QUARANTINE_SCHEMA
from megapairs_ops.stages.ingest import ingest_corpus
from megapairs_ops.stages.ingest import readers as ingest_mod
from megapairs_ops.stages.ingest import verify as verify_mod
from megapairs_ops.stages.ingest.readers import IngestError
from megapairs_ops.stages.ingest.verify import QUARANTINE_REASONS
from tests.fixtures.paths import REPO


def config(**ingest):
    return parse_config({"encoders": [{"name": "colour", "kind": "classic_color_layout"}], "ingest": ingest})


def run(corpus, tmp_path, name="run", **ingest):
    layout = RunLayout(tmp_path / name)
    stats = ingest_corpus(config(**ingest), corpus, layout)
    images = pq.read_table(layout.images)
    quarantine = pq.read_table(layout.quarantine_part("ingest"))
    return stats, images, quarantine


def reasons_by_path(quarantine: pa.Table) -> dict[str, str]:
    return {r["path"]: r["reason"] for r in quarantine.to_pylist()}


def sample_files(sample_corpus: Path, k: int) -> list[Path]:
    return sorted(p for p in (sample_corpus / "images").iterdir() if p.suffix in (".png", ".jpg"))[:k]


def copy_with_captions(files: list[Path], folder: Path) -> Path:
    """A corpus folder holding copies of `files` and their sidecar captions."""
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder)
        shutil.copy(f.with_suffix(".txt"), folder)
    return folder


def caption_of(image: Path) -> str:
    return image.with_suffix(".txt").read_text(encoding="utf-8").strip()


# ---------------------------------------------------------------------------------------------
# folder reader on the weird corpus


@pytest.fixture(scope="module")
def weird_run(weird_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("weird_run")
    return run(weird_corpus.path, tmp)


def test_every_broken_file_is_quarantined_with_its_reason(weird_corpus, weird_run):
    stats, images, quarantine = weird_run
    got = {os.path.relpath(p, weird_corpus.path): r for p, r in reasons_by_path(quarantine).items()}
    assert got == weird_corpus.expected_quarantine
    assert set(got.values()) <= set(QUARANTINE_REASONS)
    assert quarantine.schema == QUARANTINE_SCHEMA
    assert set(quarantine.column("stage").to_pylist()) == {"ingest"}
    assert all(quarantine.column("detail").to_pylist())
    huge = next(r for r in quarantine.to_pylist() if r["path"].endswith("huge_400mp.png"))
    assert "400000000" in huge["detail"]
    assert stats["items_seen"] == weird_corpus.items
    assert stats["quarantined"] == len(weird_corpus.expected_quarantine)
    assert stats["quarantine_by_reason"] == {
        r: list(weird_corpus.expected_quarantine.values()).count(r)
        for r in set(weird_corpus.expected_quarantine.values())
    }


def test_odd_but_valid_images_are_ingested(weird_corpus, weird_run):
    _, images, _ = weird_run
    rows = {os.path.relpath(r["path"], weird_corpus.path): r for r in images.to_pylist()}
    for name, mode in weird_corpus.odd_valid.items():
        assert rows[name]["mode"] == mode, name
        assert rows[name]["caption"] == weird_corpus.captions[name]
    assert "café à la plage 01.jpg" in rows
    assert set(rows) == set(weird_corpus.odd_valid) | set(weird_corpus.normal)
    assert len(rows) == weird_corpus.expected_images


def test_exact_duplicates_collapse_into_one_row(weird_corpus, weird_run):
    stats, images, _ = weird_run
    keep, dup = weird_corpus.duplicate
    row = next(r for r in images.to_pylist() if r["path"] == str(weird_corpus.path / keep))
    assert row["duplicate_paths"] == [str(weird_corpus.path / dup)]
    assert row["caption"] == weird_corpus.captions[keep]
    assert stats["duplicates_collapsed"] == 1
    assert sum(len(d) for d in images.column("duplicate_paths").to_pylist()) == 1


def test_images_table_schema_order_and_content(weird_corpus, weird_run):
    stats, images, _ = weird_run
    assert images.schema == IMAGES_SCHEMA
    ids = images.column("image_id").to_pylist()
    assert ids == sorted(ids) and len(set(ids)) == len(ids) == stats["images"]
    for row in images.to_pylist():
        data = Path(row["path"]).read_bytes()
        assert os.path.isabs(row["path"])
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["image_id"] == row["sha256"][:16]
        assert row["file_bytes"] == len(data)
        img = load_rgb(data, 10**8)
        assert (row["width"], row["height"]) == img.size
        assert row["phash"] == phash64(img)
        assert row["caption"] == row["caption"].strip() != ""


def test_rerun_gives_identical_output(weird_corpus, weird_run, tmp_path):
    stats, images, quarantine = weird_run
    stats2, images2, quarantine2 = run(weird_corpus.path, tmp_path, "again")
    assert stats2 == stats
    assert images2.equals(images) and quarantine2.equals(quarantine)
    # re-running into the same run directory overwrites with the same bytes
    layout = RunLayout(tmp_path / "again")
    before = layout.images.read_bytes()
    ingest_corpus(config(), weird_corpus.path, layout)
    assert layout.images.read_bytes() == before


def test_limits_come_from_config(sample_corpus, tmp_path):
    files = sample_files(sample_corpus, 6)
    folder = copy_with_captions(files, tmp_path / "few")
    sizes = sorted(f.stat().st_size for f in files)
    stats, images, quarantine = run(folder, tmp_path, "limits", max_file_bytes=sizes[2])
    assert stats["quarantine_by_reason"] == {"file_too_large": 3}
    sides = sorted(Image.open(f).width for f in files)
    stats, _, quarantine = run(folder, tmp_path, "small", min_side=sides[-1])
    assert set(quarantine.column("reason").to_pylist()) == {"too_small"}
    assert stats["images"] == sides.count(sides[-1])
    with pytest.raises(IngestError, match="none of the 6 items is usable"):
        run(folder, tmp_path, "pixels", max_pixels=1000)
    q = pq.read_table(RunLayout(tmp_path / "pixels").quarantine_part("ingest"))
    assert set(q.column("reason").to_pylist()) == {"too_large"}
    lengths = sorted(len(caption_of(f)) for f in files)
    stats, _, quarantine = run(folder, tmp_path, "chars", max_caption_chars=lengths[2])
    assert set(quarantine.column("reason").to_pylist()) == {"caption_too_long"}
    assert stats["images"] == sum(n <= lengths[2] for n in lengths)


def test_unexpected_error_becomes_corrupt_image(sample_corpus, tmp_path, monkeypatch):
    files = sample_files(sample_corpus, 3)
    victim = files[1].read_bytes()
    folder = tmp_path / "c"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder)
        shutil.copy(f.with_suffix(".txt"), folder)
    real = verify_mod.decode_rgb

    def flaky(data, max_pixels):
        if data == victim:
            raise RuntimeError("boom")
        return real(data, max_pixels)

    monkeypatch.setattr(verify_mod, "decode_rgb", flaky)
    stats, images, quarantine = run(folder, tmp_path)
    assert quarantine.to_pylist() == [
        {"path": str(folder / files[1].name), "reason": "corrupt_image", "detail": "RuntimeError: boom",
         "stage": "ingest"}
    ]
    assert stats["images"] == 2


# ---------------------------------------------------------------------------------------------
# manifest reader


@pytest.fixture()
def manifest_dir(sample_corpus, tmp_path):
    """A manifest folder with images inside it, one outside, and a symlink that escapes."""
    root = tmp_path / "manifest"
    (root / "imgs").mkdir(parents=True)
    files = sample_files(sample_corpus, 8)
    for f in files[:6]:
        shutil.copy(f, root / "imgs")
    outside = tmp_path / "outside.png"
    shutil.copy(files[6], outside)
    (root / "imgs" / "sneaky.png").symlink_to(outside)
    rows = [{"img": f"imgs/{f.name}", "re_caption": caption_of(f)} for f in files[:5]]
    rows += [
        {"img": f"./imgs/../imgs/{files[5].name}", "re_caption": None},  # missing caption
        {"img": "../outside.png", "re_caption": "escapes with .."},
        {"img": "imgs/sneaky.png", "re_caption": "escapes through a symlink"},
        {"img": str(files[7]), "re_caption": "absolute path elsewhere"},
        {"img": "imgs/not_there.jpg", "re_caption": "file is missing"},
        {"img": "", "re_caption": "no path"},
    ]
    return root, files, rows


def write_manifest(root: Path, rows: list[dict], fmt: str) -> Path:
    path = root / f"manifest.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n\n")
    else:
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["img", "re_caption"])
            writer.writeheader()
            writer.writerows(rows)
    return path


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_manifest_reader(manifest_dir, tmp_path, fmt):
    root, files, rows = manifest_dir
    manifest = write_manifest(root, rows, fmt)
    columns = {"path": "img", "caption": "re_caption"}
    stats, images, quarantine = run(manifest, tmp_path, columns=columns)
    assert stats["reader"] == "manifest"
    assert sorted(images.column("path").to_pylist()) == sorted(str(root / "imgs" / f.name) for f in files[:5])
    captions = {str(root / "imgs" / f.name): caption_of(f) for f in files[:5]}
    assert {r["path"]: r["caption"] for r in images.to_pylist()} == captions
    got = reasons_by_path(quarantine)
    # CSV has no null: an empty cell is a blank caption, not a missing one
    expected = {
        str(root / "imgs" / files[5].name): "blank_caption" if fmt == "csv" else "missing_caption",
        str(tmp_path / "outside.png"): "path_outside_allowed_roots",
        str(root / "imgs" / "sneaky.png"): "path_outside_allowed_roots",
        str(files[7]): "path_outside_allowed_roots",
        str(root / "imgs" / "not_there.jpg"): "unreadable",
    }
    bad_rows = {p: r for p, r in got.items() if p.startswith(str(manifest) + ":")}
    assert {p: r for p, r in got.items() if p not in bad_rows} == expected
    assert set(bad_rows.values()) == {"bad_manifest_row"}
    assert len(bad_rows) == (2 if fmt == "jsonl" else 1)

    # allowed_roots widens what may be read
    _, images, quarantine = run(
        manifest, tmp_path, "wide", columns=columns, allowed_roots=[str(root), str(files[7].parent)]
    )
    assert str(files[7]) in images.column("path").to_pylist()
    assert str(tmp_path / "outside.png") in reasons_by_path(quarantine)


def test_manifest_with_wrong_column_names_is_a_clear_error(manifest_dir, tmp_path):
    root, _, rows = manifest_dir
    for fmt in ("parquet", "jsonl", "csv"):
        manifest = write_manifest(root, rows, fmt)
        with pytest.raises(IngestError, match="ingest.columns") as err:
            run(manifest, tmp_path)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# webdataset reader


def add(tf: tarfile.TarFile, name: str, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    tf.addfile(info, io.BytesIO(data) if data else None)


def write_shard(path: Path, samples: list[tuple[str, Path, dict]]) -> None:
    """samples: (key, image file, {"txt": str} and/or {"json": dict})."""
    with tarfile.open(path, "w") as tf:
        for key, image, meta in samples:
            add(tf, f"{key}{image.suffix}", image.read_bytes())
            if "txt" in meta:
                add(tf, f"{key}.txt", meta["txt"].encode())
            if "json" in meta:
                add(tf, f"{key}.json", json.dumps(meta["json"]).encode())


@pytest.fixture()
def shards(sample_corpus, tmp_path):
    files = sample_files(sample_corpus, 9)
    folder = tmp_path / "wds"
    folder.mkdir()
    write_shard(folder / "00000.tar", [
        ("000000000", files[0], {"txt": caption_of(files[0]), "json": {"caption": "ignored: txt wins"}}),
        ("000000001", files[1], {"json": {"caption": caption_of(files[1]), "url": "http://x", "key": "1"}}),
        ("000000002", files[2], {"json": {"status": "success"}}),  # no caption anywhere
        ("000000003", files[3], {"txt": "   "}),
    ])
    with tarfile.open(folder / "00001.tar", "w") as tf:
        add(tf, "sub", type=tarfile.DIRTYPE)
        add(tf, "sub/000000010.jpg" if files[4].suffix == ".jpg" else "sub/000000010.png", files[4].read_bytes())
        add(tf, "sub/000000010.txt", b"an older caption, overwritten by the next member")
        add(tf, "sub/000000010.txt", caption_of(files[4]).encode())
        add(tf, "../evil.png", files[5].read_bytes())
        add(tf, "/etc/evil.png", files[5].read_bytes())
        add(tf, "link.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add(tf, "hard.png", type=tarfile.LNKTYPE, linkname="sub/000000010.png")
        add(tf, "dev.png", type=tarfile.CHRTYPE)
        add(tf, "000000011.jpg", b"")
        add(tf, "000000011.txt", b"empty image")
    shutil.copy(files[6], folder / "not_a_shard.png")  # stray files next to shards are ignored
    return folder, files


def test_webdataset_reader(shards, tmp_path):
    folder, files = shards
    stats, images, quarantine = run(folder, tmp_path)
    assert stats["reader"] == "webdataset"
    shard0, shard1 = str(folder / "00000.tar"), str(folder / "00001.tar")
    member10 = f"sub/000000010{files[4].suffix}"
    rows = {r["path"]: r for r in images.to_pylist()}
    assert set(rows) == {
        f"{shard0}#000000000{files[0].suffix}",
        f"{shard0}#000000001{files[1].suffix}",
        f"{shard1}#{member10}",
    }
    assert rows[f"{shard0}#000000000{files[0].suffix}"]["caption"] == caption_of(files[0])
    assert rows[f"{shard0}#000000001{files[1].suffix}"]["caption"] == caption_of(files[1])
    assert rows[f"{shard1}#{member10}"]["caption"] == caption_of(files[4])
    for path, row in rows.items():
        data = read_image_bytes(path)
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
    assert read_image_bytes(f"{shard1}#{member10}") == files[4].read_bytes()

    assert reasons_by_path(quarantine) == {
        f"{shard0}#000000002{files[2].suffix}": "missing_caption",
        f"{shard0}#000000003{files[3].suffix}": "blank_caption",
        f"{shard1}#../evil.png": "unsafe_tar_member",
        f"{shard1}#/etc/evil.png": "unsafe_tar_member",
        f"{shard1}#link.png": "unsafe_tar_member",
        f"{shard1}#hard.png": "unsafe_tar_member",
        f"{shard1}#dev.png": "unsafe_tar_member",
        f"{shard1}#000000011.jpg": "empty_file",
        f"{shard1}#sub/000000010.txt": "duplicate_tar_member",
    }
    assert not list(tmp_path.rglob("evil.png"))  # nothing was extracted


def test_single_shard_and_damaged_shard(shards, tmp_path):
    folder, files = shards
    stats, images, _ = run(folder / "00000.tar", tmp_path, "one")
    assert stats["reader"] == "webdataset" and stats["images"] == 2

    # Cut the shard inside the data of its second image: what precedes the cut is still used.
    damaged = tmp_path / "damaged.tar"
    with tarfile.open(folder / "00000.tar") as tf:
        second = tf.getmember(f"000000001{files[1].suffix}")
    data = (folder / "00000.tar").read_bytes()
    damaged.write_bytes(data[: second.offset_data + second.size // 2])
    stats, images, quarantine = run(damaged, tmp_path, "damaged")
    assert images.column("path").to_pylist() == [f"{damaged}#000000000{files[0].suffix}"]
    assert reasons_by_path(quarantine) == {
        f"{damaged}#000000001{files[1].suffix}": "unreadable",
        str(damaged): "unreadable",
    }
    assert read_image_bytes(f"{damaged}#000000000{files[0].suffix}") == files[0].read_bytes()

    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(IngestError):
        run(junk, tmp_path, "junk")
    assert reasons_by_path(pq.read_table(RunLayout(tmp_path / "junk").quarantine_part("ingest"))) == {
        str(junk): "unreadable"
    }


# ---------------------------------------------------------------------------------------------
# reader choice and whole-corpus errors


def test_auto_reader_choice(sample_corpus, shards, manifest_dir, tmp_path):
    assert ingest_mod.detect_reader(sample_corpus, "auto")[0] == "folder"
    assert ingest_mod.detect_reader(shards[0], "auto")[0] == "webdataset"
    assert ingest_mod.detect_reader(shards[0] / "00000.tar", "auto")[0] == "webdataset"
    manifest = write_manifest(manifest_dir[0], manifest_dir[2], "jsonl")
    assert ingest_mod.detect_reader(manifest, "auto")[0] == "manifest"
    assert ingest_mod.detect_reader(shards[0], "folder") == ("folder", [shards[0]])
    with pytest.raises(IngestError, match="reader 'manifest'"):
        ingest_mod.detect_reader(sample_corpus, "manifest")
    with pytest.raises(IngestError, match="webdataset"):
        ingest_mod.detect_reader(sample_corpus, "webdataset")


@pytest.mark.parametrize("kind", ["missing", "empty", "no_images", "unsupported_file"])
def test_unusable_corpus_is_a_one_line_error(tmp_path, kind):
    corpus = tmp_path / "corpus"
    if kind == "empty":
        corpus.mkdir()
    elif kind == "no_images":
        corpus.mkdir()
        (corpus / "readme.txt").write_text("no pictures here")
    elif kind == "unsupported_file":
        corpus = tmp_path / "list.txt"
        corpus.write_text("a.jpg\n")
    with pytest.raises(IngestError) as err:
        ingest_corpus(config(), corpus, RunLayout(tmp_path / "run"))
    assert "\n" not in str(err.value) and str(corpus) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_names_that_are_not_utf8_are_quarantined_not_fatal(sample_corpus, tmp_path):
    files = sample_files(sample_corpus, 2)
    folder = copy_with_captions(files, tmp_path / "names")
    bad = os.fsdecode(bytes(folder) + b"/latin1-\xe9t\xe9.png")
    shutil.copy(files[0], bad)
    Path(bad).with_suffix(".txt").write_text("caption")
    stats, images, quarantine = run(folder, tmp_path)
    assert stats["images"] == 2
    [row] = quarantine.to_pylist()
    assert row["reason"] == "unreadable" and row["path"].endswith("latin1-\\xe9t\\xe9.png")


# -- work items: ranges of the corpus, several processes, resume after a kill ---------------------

SMALL_ITEMS = {"shard_size": 16}  # 120 sample images: 8 work items, ranges of the folder listing
ITEM_IDS = [f"files-{a:09d}-{min(a + 16, 120):09d}" for a in range(0, 120, 16)]


def _context(corpus: Path, out: Path):
    from megapairs_ops.pipeline import RunContext

    return RunContext(config(**SMALL_ITEMS), corpus, RunLayout(out), run_id="r")


def _outputs(layout: RunLayout) -> tuple[pa.Table, pa.Table]:
    return pq.read_table(layout.images), pq.read_table(layout.quarantine_part("ingest"))


@pytest.mark.slow
def test_the_cli_executor_spreads_ingest_items_over_worker_processes(sample_corpus, tmp_path):
    from megapairs_ops.pipeline import RunContext, finalize_stage, get_stage, plan_stage
    from megapairs_ops.pipeline.executor import run_items
    from megapairs_ops.storage import WorkDir

    ctx = _context(sample_corpus, tmp_path / "two")
    items = plan_stage(ctx, "ingest")
    assert [i["id"] for i in items] == ITEM_IDS
    run_items(ctx, get_stage("ingest"), items, workers=2)
    work = WorkDir(ctx.layout.work_dir("ingest"))
    by_process: dict[int, list[str]] = {}
    for item in items:
        by_process.setdefault(work.stats(item["id"])["worker_pid"], []).append(item["id"])
    # Two worker processes, not this one, four items each.
    assert len(by_process) == 2 and os.getpid() not in by_process
    assert sorted(len(ids) for ids in by_process.values()) == [4, 4]
    finalize_stage(ctx, "ingest")

    # Too few items to pay for starting processes (under two each): this process runs them.
    few = RunContext(config(shard_size=60), sample_corpus, RunLayout(tmp_path / "few"), run_id="r")
    few_items = plan_stage(few, "ingest")
    assert len(few_items) == 2
    run_items(few, get_stage("ingest"), few_items, workers=2)
    few_work = WorkDir(few.layout.work_dir("ingest"))
    assert {few_work.stats(i["id"])["worker_pid"] for i in few_items} == {os.getpid()}

    one = _context(sample_corpus, tmp_path / "one")
    from megapairs_ops.pipeline import run_stage

    run_stage(one, "ingest", workers=1)
    for two_table, one_table in zip(_outputs(ctx.layout), _outputs(one.layout)):
        assert two_table.equals(one_table)


@pytest.mark.slow
def test_a_killed_ingest_resumes_at_its_first_unfinished_item(sample_corpus, tmp_path, monkeypatch):
    """A real `megapairs run --until ingest` process is SIGKILLed right after its third item
    commits; the next run verifies only the five items left and writes what an uninterrupted run
    writes."""
    import signal
    import subprocess
    import sys
    import textwrap

    import yaml

    from megapairs_ops.pipeline import run_stage
    from megapairs_ops.stages.ingest import work as ingest_work

    config_file = tmp_path / "small-items.yaml"
    config_file.write_text(yaml.safe_dump({"encoders": [{"name": "colour", "kind": "classic_color_layout"}],
                                           "ingest": SMALL_ITEMS}))
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal
        from megapairs_ops.cli import main
        from megapairs_ops.storage import WorkDir
        commit = WorkDir.commit
        def commit_then_die(self, item_id, stats):
            commit(self, item_id, stats)
            if len(list((self.root / "items").glob("*.json"))) >= 3:
                os.kill(os.getpid(), signal.SIGKILL)
        WorkDir.commit = commit_then_die
        main(["run", "--config", {str(config_file)!r}, "--corpus", {str(sample_corpus)!r}, "--out", {str(out)!r},
              "--until", "ingest", "--workers", "1"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    layout = RunLayout(out)
    assert not layout.images.exists()
    committed = sorted(p.stem for p in (layout.work_dir("ingest") / "items").glob("*.json"))
    assert committed == ITEM_IDS[:3]

    ran: list[str] = []
    real = ingest_work.run_ingest_item
    monkeypatch.setattr(ingest_work, "run_ingest_item",
                        lambda cfg, work, spec, threads: ran.append(spec["id"]) or real(cfg, work, spec, threads))
    from megapairs_ops.pipeline import context_from_params

    ctx = context_from_params(config_file, sample_corpus, out)
    record = run_stage(ctx, "ingest", workers=1)
    assert ran == ITEM_IDS[3:]
    assert record["items_seen"] == 120

    reference = _context(sample_corpus, tmp_path / "reference")
    run_stage(reference, "ingest", workers=1)
    for resumed, clean in zip(_outputs(layout), _outputs(reference.layout)):
        assert resumed.equals(clean)
