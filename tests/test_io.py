"""istune.io: files and folders appear whole or not at all, with one permission rule."""

import json
import os
import stat

import pytest

from istune import io


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _expected(base):
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def test_write_text_json_and_permissions(tmp_path):
    path = io.write_text(tmp_path / "a" / "b.txt", "héllo")
    assert path.read_text(encoding="utf-8") == "héllo"
    assert _mode(path) == _expected(0o666)
    io.write_json(tmp_path / "c.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c.json"]  # no temporary file left


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    io.write_json(path, {"old": True})
    with pytest.raises(TypeError):
        io.write_json(path, {"bad": object()})  # fails while serialising
    with pytest.raises(RuntimeError):
        with io.atomic_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_temporary_names_are_unique_and_keep_the_suffix(tmp_path):
    with io.atomic_file(tmp_path / "plot.png") as first, io.atomic_file(tmp_path / "plot.png") as second:
        assert first != second
        assert first.suffix == second.suffix == ".png"
        first.write_bytes(b"1")
        second.write_bytes(b"2")
    assert (tmp_path / "plot.png").read_bytes() == b"1"  # the outer writer finished last


def test_atomic_dir(tmp_path):
    target = tmp_path / "adapter"
    with io.atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"w")
        os.chmod(tmp / "w.bin", 0o600)
        assert not target.exists()
    assert (target / "w.bin").read_bytes() == b"w"
    assert _mode(target) == _expected(0o777) and _mode(target / "w.bin") == _expected(0o666)
    with pytest.raises(FileExistsError):
        with io.atomic_dir(target) as tmp:
            (tmp / "w.bin").write_bytes(b"new")
    with pytest.raises(RuntimeError):
        with io.atomic_dir(target, replace=True) as tmp:
            raise RuntimeError("killed")
    assert (target / "w.bin").read_bytes() == b"w"
    with io.atomic_dir(target, replace=True) as tmp:
        (tmp / "v.bin").write_bytes(b"v")
    assert sorted(p.name for p in target.iterdir()) == ["v.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_git_commit_outside_git(tmp_path):
    assert io.git_commit(tmp_path) == "unknown"


def test_recorded_paths_are_relative_to_the_repository_holding_them(tmp_path):
    from istune.io import repo_relative

    (tmp_path / "repo" / ".git").mkdir(parents=True)
    inside = tmp_path / "repo" / "benchmarks" / "results" / "x"
    assert repo_relative(inside) == "benchmarks/results/x"
    assert repo_relative(tmp_path / "repo") == "."
    outside = tmp_path / "elsewhere" / "run"
    assert repo_relative(outside) == str(outside)
