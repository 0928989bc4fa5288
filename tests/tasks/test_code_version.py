"""tasks/code_version.py: the code hash, and the one-line refusal of a Ray worker on other code.
(A whole build refused by a second node on a changed copy: tests/reliability/test_code_version.py.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tasks.code_version import PACKAGES, CodeMismatch, check_code, code_hash, on_driver_code

REPO = Path(__file__).resolve().parents[2]


def hash_with(pythonpath: Path) -> str:
    code = "import tasks.code_version as c; print(c.code_hash())"
    return subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(pythonpath)}, cwd="/",
                          capture_output=True, text=True, check=True).stdout.strip()


def test_the_hash_covers_every_package_the_project_installs():
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(pattern.rstrip("*") for pattern in include) == sorted(PACKAGES)


def test_one_changed_line_changes_the_hash_and_a_copy_keeps_it(tmp_path):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    same = hash_with(tmp_path)
    with (tmp_path / "storage" / "shards.py").open("a") as changed:
        changed.write("# one changed line\n")
    assert same == hash_with(REPO) == code_hash()  # wherever it lies, the same source has the same hash
    assert hash_with(tmp_path) != same


def test_a_worker_on_the_drivers_code_runs_and_one_on_other_code_is_refused_in_one_line(ray_local):
    ray = ray_local
    code_hash.cache_clear()  # the driver's code as of now (the first test may have hashed it long before)
    # Workers of the same code compute the driver's hash, and a checked function keeps its task name.
    checked = on_driver_code(code_hash)
    assert checked.__name__ == "code_hash"
    assert ray.get(ray.remote(checked).remote()) == code_hash()

    other = "0" * 64
    with pytest.raises(ray.exceptions.RayTaskError) as refused:
        ray.get(ray.remote(max_retries=0)(check_code).remote(other))
    error = refused.value.cause
    assert isinstance(error, CodeMismatch) and isinstance(error, ValueError)  # ValueError: never retried
    node = ray.get_runtime_context().get_node_id()[:12]
    assert str(error).count("\n") == 0
    assert f"(id {node}) runs code {code_hash()[:12]}, the driver {other[:12]}" in str(error)
    with pytest.raises(CodeMismatch):
        check_code(other)  # in this process too
    check_code(code_hash())
