import os
import stat

import pytest

from invasive_dist import files
from invasive_dist.files import atomic_link, atomic_write, is_temp, remove_stale_temps, write_text


def test_failed_durable_write_keeps_the_old_file_and_no_temp(tmp_path):
    p = write_text(tmp_path / "a.json", "old")

    def half_then_fail(tmp):
        tmp.write_text("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(p, half_then_fail, durable=True)
    assert p.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_durable_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    p = write_text(tmp_path / "a.pt", "old")
    seen = []  # (is a folder, the target's content at that moment)
    real_fsync = os.fsync
    monkeypatch.setattr(
        os,
        "fsync",
        lambda fd: (seen.append((stat.S_ISDIR(os.fstat(fd).st_mode), p.read_text())), real_fsync(fd)),
    )
    atomic_write(p, lambda tmp: tmp.write_text("new"), durable=True)
    assert p.read_text() == "new"
    assert seen == [(False, "old"), (True, "new")]
    seen.clear()
    write_text(p, "small")  # not durable: no fsync
    assert seen == []


def test_link_replaces_the_target_atomically_and_copies_without_hard_links(tmp_path, monkeypatch):
    src = write_text(tmp_path / "step-00000002.pt", "two")
    dst = write_text(tmp_path / "last.pt", "one")
    atomic_link(src, dst, durable=True)
    assert os.path.samefile(src, dst)
    src3 = write_text(tmp_path / "step-00000003.pt", "three")

    def no_links(a, b):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    atomic_link(src3, dst)
    assert dst.read_text() == "three" and not os.path.samefile(src3, dst)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_stale_temp_cleanup_removes_only_temps(tmp_path):
    temps = [files.temp_path(tmp_path / "step-00000003.pt"), tmp_path / ".cv.json.123.tmp"]
    others = ["step-00000002.pt", "last.pt", ".hidden", "notes.tmp", ".x.tmp", ".a.json.12a.tmp"]
    for p in temps + [tmp_path / n for n in others]:
        p.write_text("x")
    (tmp_path / ".sub.7.tmp").mkdir()  # a folder is never a temp file of a write
    assert all(is_temp(p) for p in temps) and not any(is_temp(n) for n in others)
    assert sorted(remove_stale_temps(tmp_path)) == sorted(temps)
    assert sorted(os.listdir(tmp_path)) == sorted(others + [".sub.7.tmp"])
    assert remove_stale_temps(tmp_path / "missing") == []
