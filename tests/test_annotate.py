import hashlib
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megapairs_ops.annotate import ANNOTATION_SCHEMA, annotate_pairs
from megapairs_ops.annotation.backends import Backend
from megapairs_ops.annotation.parsing import check_instructions
from megapairs_ops.annotation.template import TemplateBackend
from megapairs_ops.config import parse_config
from megapairs_ops.storage import FAILURE_SCHEMA, RunLayout

CAPTIONS = [
    "A red bicycle leaning against a yellow wall",
    "A cream scooter parked by a green wall",
    "A ginger cat asleep on a grey sofa",
    "A border collie sitting on a grey sofa",
    "Red apples in a wooden bowl on marble",
    "Oranges in a wooden bowl on marble",
    "A lighthouse on rocks under a clear sky",
    "A lighthouse on rocks in a storm at night",
]
# (q, t) by index into CAPTIONS; 8 stands for an image id that ingest never produced.
PAIR_INDEXES = [(0, 1), (1, 0), (2, 3), (3, 2), (4, 5), (5, 4), (6, 7), (7, 6), (0, 8), (2, 5), (7, 3)]
BROKEN = 7  # this image's file is corrupt: only backends that look at pixels notice


def pair_id(q, t):
    return hashlib.sha256(f"{q}:{t}".encode()).hexdigest()[:16]


def write_inputs(root):
    """A hand-made images.parquet and pairs.parquet in the contract's schemas."""
    layout = RunLayout(root)
    img_dir = root / "corpus"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        path = img_dir / f"img{i}.png"
        if i == BROKEN:
            path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        else:
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        rows.append(
            {"image_id": sha[:16], "sha256": sha, "path": str(path), "caption": caption, "width": 64,
             "height": 48, "mode": "RGB", "phash": i, "file_bytes": len(data), "duplicate_paths": []}
        )
    ids = [r["image_id"] for r in rows] + ["00000000deadbeef"]
    layout.images.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(sorted(rows, key=lambda r: r["image_id"])), layout.images)
    pairs = [
        {"pair_id": pair_id(ids[q], ids[t]), "q_id": ids[q], "t_id": ids[t], "encoders": ["color"],
         "sims": [0.9], "max_sim": 0.9, "hn_ids": []}
        for q, t in PAIR_INDEXES
    ]
    pq.write_table(pa.Table.from_pylist(pairs[::-1]), layout.pairs)  # deliberately not in pair_id order
    return layout


def make_cfg(batch_size=3, seed=0, **annotate):
    return parse_config(
        {
            "seed": seed,
            "encoders": [{"name": "color", "kind": "classic_color_layout"}],
            "annotate": {"batch_size": batch_size, **annotate},
        }
    )


@pytest.fixture
def layout(tmp_path):
    return write_inputs(tmp_path / "run")


def read(path):
    return pq.read_table(path)


class Recording(Backend):
    """The template baseline, remembering which pairs it was asked about."""

    kind = "template"

    def __init__(self, crash_after_batches=None):
        super().__init__()
        self.inner = TemplateBackend()
        self.model_name = self.inner.model_name
        self.seen: list[str] = []
        self.crash_after_batches = crash_after_batches
        self.batches = 0

    def describe(self, requests):
        if self.crash_after_batches is not None and self.batches >= self.crash_after_batches:
            raise KeyboardInterrupt("simulated kill")
        self.batches += 1
        self.seen += [r.pair_id for r in requests]
        return self.inner.describe(requests)

    def instruct(self, requests):
        return self.inner.instruct(requests)


def check_outputs(layout, cfg, stats):
    ann, fail = read(layout.annotations), read(layout.failures_part("annotate"))
    assert ann.schema.equals(ANNOTATION_SCHEMA) and fail.schema.equals(FAILURE_SCHEMA)
    ids = ann.column("pair_id").to_pylist()
    failed_ids = fail.column("pair_id").to_pylist()
    all_ids = sorted(pq.read_table(layout.pairs).column("pair_id").to_pylist())
    assert stats["accepted"] + stats["failed"] == stats["pairs_in"] == len(all_ids)
    assert len(ids) == len(set(ids)) and len(failed_ids) == len(set(failed_ids))
    assert sorted(ids + failed_ids) == all_ids  # nothing lost, nothing doubled
    assert ids == sorted(ids)
    lo, hi = cfg.annotate.word_num
    for row in ann.to_pylist():
        assert lo <= row["word_num"] <= hi
        assert check_instructions(row["instructions"], row["description"], cfg.annotate.min_instructions)[0]
        assert row["prompt_version"] == "v1" and 1 <= row["attempts"] <= cfg.annotate.max_attempts
    return ann, fail


def test_template_stage_accepts_every_pair_with_images(layout):
    cfg = make_cfg()
    stats = annotate_pairs(cfg, layout, "run-1")
    ann, fail = check_outputs(layout, cfg, stats)
    assert stats["pairs_in"] == 11 and stats["accepted"] == 10 and stats["failed"] == 1
    assert stats["failures_by_reason"] == {"image_missing": 1}
    assert fail.to_pylist()[0]["stage"] == "annotate" and "00000000deadbeef" in fail.to_pylist()[0]["detail"]
    assert stats["describe_model"] == stats["instruct_model"] == "template-baseline-v1"
    assert set(ann.column("describe_backend").to_pylist()) == {"template"}
    assert stats["requests"] == {"describe": 10, "instruct": 10}
    assert stats["batches"] == 4 and stats["batches_resumed"] == 0
    assert len(list(layout.annotation_dir("batches").glob("part-*.parquet"))) == 4


def test_rerun_is_a_no_op_and_identical(layout):
    cfg = make_cfg()
    annotate_pairs(cfg, layout, "run-1")
    first = read(layout.annotations)
    recorder = Recording()
    stats = annotate_pairs(cfg, layout, "run-1", backends=(recorder, recorder))
    assert recorder.seen == [] and stats["batches_resumed"] == 4 and stats["parts_reused"]
    assert read(layout.annotations).equals(first)


def test_deleted_middle_part_is_recomputed_alone(layout):
    cfg = make_cfg()
    annotate_pairs(cfg, layout, "run-1")
    first, first_fail = read(layout.annotations), read(layout.failures_part("annotate"))
    middle = layout.annotation_dir("batches") / "part-00001.parquet"
    expected = read(middle).column("pair_id").to_pylist()
    middle.unlink()
    recorder = Recording()
    stats = annotate_pairs(cfg, layout, "run-1", backends=(recorder, recorder))
    assert recorder.seen == expected and stats["batches_resumed"] == 3
    assert read(layout.annotations).equals(first)
    assert read(layout.failures_part("annotate")).equals(first_fail)


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    cfg = make_cfg()
    reference = write_inputs(tmp_path / "reference")
    annotate_pairs(cfg, reference, "run-1")

    layout = write_inputs(tmp_path / "killed")  # same seeded bytes, so the same image and pair ids
    dying = Recording(crash_after_batches=2)
    with pytest.raises(KeyboardInterrupt):
        annotate_pairs(cfg, layout, "run-1", backends=(dying, dying))
    assert sorted(p.name for p in layout.annotation_dir("batches").glob("*.parquet")) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert not layout.annotations.exists()
    resumed = Recording()
    stats = annotate_pairs(cfg, layout, "run-1", backends=(resumed, resumed))
    later = [reference.annotation_dir("batches") / f"part-0000{i}.parquet" for i in (2, 3)]
    assert stats["batches_resumed"] == 2
    assert resumed.seen == [pid for part in later for pid in read(part).column("pair_id").to_pylist()]
    assert read(layout.annotations).equals(read(reference.annotations))
    check_outputs(layout, cfg, stats)


def test_changed_settings_discard_old_parts(layout):
    annotate_pairs(make_cfg(seed=0), layout, "run-1")
    before = read(layout.annotations)
    stats = annotate_pairs(make_cfg(seed=1), layout, "run-1")
    assert not stats["parts_reused"] and stats["batches_resumed"] == 0
    after = read(layout.annotations)
    assert after.column("pair_id").equals(before.column("pair_id"))
    assert after.column("word_num").to_pylist() != before.column("word_num").to_pylist()
    stats = annotate_pairs(make_cfg(seed=1, batch_size=5), layout, "run-1")
    assert stats["batches"] == 3 and stats["batches_resumed"] == 0
    assert read(layout.annotations).equals(after)  # batching never changes the result


def openai_cfg(llm_server, **annotate):
    step = {"backend": "openai", "model": "fake-mllm", "base_url": llm_server.base_url, "concurrency": 3,
            "image_max_side": 64}
    return make_cfg(describe=step, instruct=step, **annotate)


def test_openai_stage_against_loopback_server(layout, llm_server):
    llm_server.reset()
    cfg = openai_cfg(llm_server)
    stats = annotate_pairs(cfg, layout, "run-1")
    ann, fail = check_outputs(layout, cfg, stats)
    # Pairs touching the corrupt image fail once, without a retry; the unknown id never gets a request.
    reasons = {r["pair_id"]: (r["reason"], r["attempts"]) for r in fail.to_pylist()}
    assert sorted(v[0] for v in reasons.values()) == ["image_missing"] + ["truncated_image"] * 3
    assert all(attempts <= 1 for _, attempts in reasons.values())
    assert stats["accepted"] == 7 and stats["describe_model"] == "fake-mllm"
    assert set(ann.column("describe_backend").to_pylist()) == {"openai"}
    describes = llm_server.chat_requests("describe")
    assert len(describes) == 7 and all(len(r.images()) == 2 for r in describes)
    assert len(llm_server.chat_requests("instruct")) == 7
    # Each instruct prompt carries five demonstrations and the accepted description.
    prompt = llm_server.chat_requests("instruct")[0].text()
    assert prompt.count("Description:") == 6
    assert any(row["description"] in prompt for row in ann.to_pylist())

    # A forced full re-run against the same server gives the same rows (seeded requests).
    shutil.rmtree(layout.root / "annotations")
    annotate_pairs(cfg, layout, "run-2")
    assert read(layout.annotations).equals(ann)


def good_pair_layout(root):
    """A run with exactly one pair, whose two images are both readable."""
    layout = write_inputs(root)
    pid = pair_id(*[_id(layout, i) for i in (0, 1)])
    table = read(layout.pairs)
    pq.write_table(table.filter(pa.compute.equal(table.column("pair_id"), pid)), layout.pairs)
    return layout


def _id(layout, index):
    for row in read(layout.images).to_pylist():
        if row["path"].endswith(f"img{index}.png"):
            return row["image_id"]
    raise KeyError(index)


def test_refusals_are_resampled_then_accepted(tmp_path, llm_server):
    llm_server.reset()
    layout = good_pair_layout(tmp_path / "run")
    llm_server.inject("refusal", times=2, kind="instruct")
    llm_server.inject("short", times=1, kind="describe")
    stats = annotate_pairs(openai_cfg(llm_server, max_attempts=3), layout, "run-1")
    assert stats["accepted"] == 1 and stats["failed"] == 0
    (row,) = read(layout.annotations).to_pylist()
    assert row["attempts"] == 3
    seeds = [r.body["seed"] for r in llm_server.chat_requests("instruct")]
    assert len(seeds) == 3 and len(set(seeds)) == 3  # each retry is a fresh sample


@pytest.mark.parametrize(
    ("fault", "kind", "reason"),
    [
        ("refusal", "instruct", "refusal"),
        ("too_few", "instruct", "too_few_instructions"),
        ("refusal", "describe", "refusal"),
        ("short", "describe", "description_too_short"),
        ("malformed", "instruct", "bad_response"),
    ],
)
def test_persistent_bad_output_ends_as_a_failure_row(tmp_path, llm_server, fault, kind, reason):
    llm_server.reset()
    layout = good_pair_layout(tmp_path / "run")
    llm_server.inject(fault, times=100, kind=kind)
    stats = annotate_pairs(openai_cfg(llm_server, max_attempts=2), layout, "run-1")
    assert stats["accepted"] == 0 and stats["failures_by_reason"] == {reason: 1}
    (row,) = read(layout.failures_part("annotate")).to_pylist()
    assert row["attempts"] == 2 and row["detail"].startswith(kind)
    assert len(llm_server.chat_requests(kind)) == 2
    assert read(layout.annotations).num_rows == 0


def test_transformers_instruct_path_ends_accepted_or_failed_with_reason(layout, tiny_causal_lm_dir):
    cfg = make_cfg(
        batch_size=4,
        max_attempts=2,
        instruct={"backend": "transformers", "model": str(tiny_causal_lm_dir), "max_tokens": 16, "device": "cpu"},
    )
    stats = annotate_pairs(cfg, layout, "run-1")
    ann, fail = check_outputs(layout, cfg, stats)
    assert stats["instruct_model"] == str(tiny_causal_lm_dir) and stats["requests"]["instruct"] >= 10
    # Random weights write junk: whatever they write is either accepted or failed with a reason.
    assert all(r["reason"] for r in fail.to_pylist())
    assert set(ann.column("instruct_backend").to_pylist()) <= {"transformers"}


def test_transformers_describe_path(layout, tiny_vlm_dir):
    cfg = make_cfg(
        batch_size=6,
        max_attempts=1,
        describe={"backend": "transformers", "model": str(tiny_vlm_dir), "max_tokens": 8, "image_max_side": 32},
    )
    stats = annotate_pairs(cfg, layout, "run-1")
    _, fail = check_outputs(layout, cfg, stats)
    reasons = stats["failures_by_reason"]
    assert reasons.get("image_missing") == 1 and reasons.get("truncated_image") == 3
    # Eight new tokens are far below 60 words: the real path ran and the check rejected its output.
    assert reasons.get("description_too_short") == 7
    assert stats["describe_model"] == str(tiny_vlm_dir)
