"""Packaging: the sdist holds everything setup.py needs, and a pip install of it in a fresh venv builds and runs.

test_sdist_installs_and_runs is slow (minutes: it compiles every CPU module) and runs only with PYATTN_SLOW_TESTS=1;
`make sdist-check` runs the same script. The package list check is fast and always runs."""
import ast
import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def setup_packages():
    """The literal packages=[...] of setup.py."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "packages":
            return set(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no packages=[...]")


def test_setup_lists_every_subpackage():
    """A subpackage missing from setup.py works in the editable install and breaks every installed wheel."""
    found = {"pyattn"}
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "pyattn"), followlinks=True):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        if "__init__.py" in filenames:
            found.add(os.path.relpath(dirpath, ROOT).replace(os.sep, "."))
    assert setup_packages() == found


def test_the_version_is_written_once():
    """pyattn/__init__.py's __version__ is the one source: setup.py gives it to the package metadata and to the C++
    build (build_info()["version"]); pyproject.toml leaves it dynamic."""
    import pyattn

    try:
        installed = importlib.metadata.version("pyattn")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pyattn is not installed here (build_ext --inplace): no metadata to compare")
    assert installed == pyattn.__version__ == pyattn.build_info()["version"]
    assert 'dynamic = ["version"]' in open(os.path.join(ROOT, "pyproject.toml")).read()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PYATTN_SLOW_TESTS") != "1", reason="minutes: set PYATTN_SLOW_TESTS=1 (or make "
                    "sdist-check)")
@pytest.mark.subprocess
def test_sdist_installs_and_runs(tmp_path):
    pytest.importorskip("build")
    done = subprocess.run(["bash", os.path.join(ROOT, "tools", "sdist_check.sh"), str(tmp_path)], capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=3600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "sdist smoke test: ok" in done.stdout
