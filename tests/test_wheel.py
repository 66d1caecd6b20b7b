"""The package as a release: the wheel built from the sources holds every module, the web page
and the entry point, and the installed copy finds its page."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy, so that the build leaves nothing (build/, egg-info) in the checkout.
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "mtkit", src / "mtkit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "--disable-pip-version-check", "-w", str(out)], check=True)
    (built,) = out.glob("mtkit-*.whl")
    return built


def test_wheel_holds_every_module_the_page_and_the_entry_point(wheel):
    from mtkit import __version__

    assert wheel.name.startswith(f"mtkit-{__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mtkit").rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    assert "mtkit/web/index.html" in names
    assert not [n for n in names if n.startswith(("tests/", "scripts/", "configs/"))]
    info = f"mtkit-{__version__}.dist-info"
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "mtkit = mtkit.cli:main" in entry_points


def test_installed_wheel_serves_its_page(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", str(wheel), "--no-deps", "-q",
                    "--disable-pip-version-check", "--target", str(target)], check=True)
    probe = ("import importlib.resources, mtkit; print(mtkit.__file__); "
             "print(importlib.resources.files('mtkit').joinpath('web').joinpath('index.html').read_text()[:200])")
    # -I: the installed copy alone, not the checkout; PYTHONPATH cannot apply, so the target is put first.
    code = f"import sys; sys.path.insert(0, {str(target)!r}); {probe}"
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True)
    where, page = done.stdout.split("\n", 1)
    assert where.startswith(str(target))
    assert page.lower().startswith("<!doctype html>")
