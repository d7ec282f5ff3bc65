"""The suite's own rules (tests/conftest.py): under FTTOOL_TEST_STRICT=1 a skip fails unless its reason holds on CI;
the xdist scheduler puts multi-process tests in one unit and a module's shared run on one worker."""

import os
import subprocess
import sys

from conftest import LONG, PROCESSES, ROOT, SHARED_RUNS, work_unit

SKIPS = """
import pytest

def test_needs_something():
    pytest.skip("wandb is not installed")

def test_needs_a_gpu_free_machine():
    pytest.skip("this machine has a GPU")

def test_ok():
    pass
"""


def _run(tmp_path, strict):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the project's config: no xdist, no durations
    (tmp_path / "conftest.py").write_text(  # the suite's hooks, loaded under another name than conftest
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('suite_conftest', {str(ROOT / 'tests' / 'conftest.py')!r})\n"
        "suite = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(suite)\n"
        "pytest_runtest_makereport = suite.pytest_runtest_makereport\n"
        "pytest_sessionstart = suite.pytest_sessionstart\n"
    )
    (tmp_path / "test_skips.py").write_text(SKIPS)
    env = {k: v for k, v in os.environ.items() if k != "FTTOOL_TEST_STRICT"}
    if strict:
        env["FTTOOL_TEST_STRICT"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "test_skips.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )


def test_a_skip_fails_under_strict_unless_its_reason_holds_on_ci(tmp_path):
    loose = _run(tmp_path, strict=False)
    assert loose.returncode == 0 and "1 passed, 2 skipped" in loose.stdout, loose.stdout[-2000:]
    strict = _run(tmp_path, strict=True)
    assert strict.returncode == 1, strict.stdout[-2000:]
    assert "1 failed, 1 passed, 1 skipped" in strict.stdout, strict.stdout[-2000:]
    assert "skipped under FTTOOL_TEST_STRICT=1, where nothing may be missing: wandb is not installed" in strict.stdout


def test_work_units_group_processes_and_shared_runs():
    for module, names in PROCESSES.items():
        for name in names:
            assert work_unit(f"tests/{module}::{name}[a-b]") == "processes"
    for module in SHARED_RUNS:
        assert work_unit(f"tests/{module}::test_anything[x]") == module
    assert (
        work_unit("tests/test_data.py::test_csv_keeps_numbers_as_text")
        == "tests/test_data.py::test_csv_keeps_numbers_as_text"
    )
    # every name in the tables is a test that exists: a rename cannot silently drop a test out of its unit
    for module, names in PROCESSES.items():
        text = (ROOT / "tests" / module).read_text()
        assert all(f"def {n}(" in text for n in names), module
    every = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    assert all(f"def {n}(" in every for n in LONG)
    for module, fixture in SHARED_RUNS.items():
        assert f"def {fixture}(" in (ROOT / "tests" / module).read_text(), module
