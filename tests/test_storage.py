import os
import stat

import pytest

from megapairs_ops.layout import RunLayout
from megapairs_ops.storage import atomic_dir, atomic_path, is_finished, mark_finished


def test_atomic_path_keeps_old_content_when_writer_fails(tmp_path):
    target = tmp_path / "a" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_outputs_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "f") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    # The mode follows the umask captured at import (022 for a normal session), not mkstemp's 0600.
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) & 0o044 == 0o044


def test_atomic_dir_swaps_whole_directory(tmp_path):
    target = tmp_path / "parts"
    with atomic_dir(target) as tmp:
        (tmp / "part-0").write_text("a")
        (tmp / "part-1").write_text("b")
    with atomic_dir(target) as tmp:
        (tmp / "part-0").write_text("c")
    assert sorted(p.name for p in target.iterdir()) == ["part-0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts"]


def test_status_requires_matching_fingerprint(tmp_path):
    layout = RunLayout(tmp_path)
    assert not is_finished(layout, "ingest", "fp1")
    mark_finished(layout, "ingest", "fp1", {"images": 3}, 1.5)
    assert is_finished(layout, "ingest", "fp1")
    assert not is_finished(layout, "ingest", "fp2")
    layout.status("ingest").write_text("{not json")
    assert not is_finished(layout, "ingest", "fp1")
