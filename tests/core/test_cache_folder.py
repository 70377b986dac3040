"""CacheFolder: versioned roots, paths that stay inside data_dir, no prompts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchfactory_dagster.core.cache_folder import CacheFolder
from batchfactory_dagster.core.errors import ConfigError


def test_root_name_and_creation(tmp_path):
    folder = CacheFolder("quickstart", 1, 0, 0, data_dir=tmp_path / "data")
    assert folder.root == (tmp_path / "data" / "quickstart_v1.0.0").resolve()
    assert folder.root.is_dir() and folder.version == "v1.0.0"
    assert CacheFolder("p", 2, data_dir=tmp_path).root.name == "p_v2"
    assert CacheFolder("p", 2, 5, data_dir=tmp_path).root.name == "p_v2.5"
    assert os.fspath(folder) == str(folder.root) and "quickstart_v1.0.0" in repr(folder)


def test_default_data_dir_is_relative_to_cwd_at_construction(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = CacheFolder("demo", 1)
    monkeypatch.chdir("/")
    assert folder.root == (tmp_path / "data" / "demo_v1").resolve()
    assert folder.root.is_absolute()


def test_getitem_returns_absolute_str_and_makes_parents(tmp_path):
    folder = CacheFolder("p", 1, 0, 0, data_dir=tmp_path)
    path = folder["cache/llm/broker.jsonl"]
    assert isinstance(path, str) and os.path.isabs(path)
    assert path == str(folder.root / "cache" / "llm" / "broker.jsonl")
    assert os.path.isdir(os.path.dirname(path)) and not os.path.exists(path)
    assert folder.path("out/a.jsonl") == folder.root / "out" / "a.jsonl"
    assert folder["./x.txt"] == str(folder.root / "x.txt")


@pytest.mark.parametrize("rel", ["../escape.txt", "a/../../b", "/etc/passwd", ""])
def test_rel_paths_that_leave_the_folder_are_refused(tmp_path, rel):
    folder = CacheFolder("p", 1, data_dir=tmp_path)
    with pytest.raises(ConfigError) as info:
        folder[rel]
    assert repr(rel) in str(info.value)
    assert not (tmp_path / "escape.txt").exists()


def test_symlink_inside_pointing_outside_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = CacheFolder("p", 1, data_dir=tmp_path / "data")
    (folder.root / "link").symlink_to(outside)
    with pytest.raises(ConfigError, match="'link/x.txt'.*resolves to"):
        folder["link/x.txt"]


@pytest.mark.parametrize("name", ["../up", "a/b", "/abs", "", "  ", 3])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(ConfigError) as info:
        CacheFolder(name, 1, data_dir=tmp_path)
    assert repr(name) in str(info.value)


def test_symlinked_root_escaping_data_dir_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "p_v1").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="'p'.*would leave"):
        CacheFolder("p", 1, data_dir=data)


@pytest.mark.parametrize("version", [(-1,), ("1",), (1, None, 2), (True,), (1, 1.5)])
def test_bad_versions_are_refused(tmp_path, version):
    with pytest.raises(ConfigError, match="version"):
        CacheFolder("p", *version, data_dir=tmp_path)


def test_never_reads_stdin(tmp_path, monkeypatch):
    def no_input(*_):
        raise AssertionError("CacheFolder must not prompt")

    monkeypatch.setattr("builtins.input", no_input)
    folder = CacheFolder("p", 1, data_dir=tmp_path)
    Path(folder["a.txt"]).write_text("x")
    assert CacheFolder("p", 1, data_dir=tmp_path)["a.txt"] == folder["a.txt"]
