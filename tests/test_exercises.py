"""Every exercise is gradable: its graded tests all fail on the starter and all pass on the solution."""

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from looplm.grade import find_exercises, run_exercise_tests

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = find_exercises(root=ROOT)


def test_there_are_exercises_and_each_has_tests_and_a_solution():
    assert EXERCISES, "no exercises found"
    for ex in EXERCISES:
        chapter = ex.module.parent.name
        assert ex.tests.is_file(), f"{ex.module} has no graded tests {ex.tests.name}"
        solution = ROOT / "exercises" / "solutions" / chapter / ex.module.name
        assert solution.is_file(), f"{ex.module} has no reference solution"
        assert ex.number.split(".")[0] == str(int(chapter[2:])), \
            f"{ex.module}: exercise {ex.number} does not belong to {chapter}"
        assert not ex.warning, ex.warning  # named by its docstring, not by the fallback


def test_every_starter_raises_not_implemented_naming_its_exercise():
    for ex in EXERCISES:
        source = ex.module.read_text(encoding="utf-8")
        assert f'NotImplementedError("Exercise {ex.number}' in source, \
            f"{ex.module} should raise NotImplementedError(\"Exercise {ex.number}: …\")"
        ast.parse(source)


@pytest.fixture(scope="module")
def starter_outcomes():
    return run_exercise_tests(EXERCISES, source="reader", isolate=False)   # our own code: one process per CPU


@pytest.fixture(scope="module")
def solution_outcomes():
    return run_exercise_tests(EXERCISES, source="solutions", isolate=False)


def test_every_graded_test_fails_on_the_starter(starter_outcomes):
    for ex in EXERCISES:
        mine = [o for o in starter_outcomes if o.exercise == ex.number]
        assert len(mine) >= 2, f"exercise {ex.number} has fewer than two graded tests"
        passing = [o.name for o in mine if o.passed]
        assert not passing, f"exercise {ex.number}: tests pass on the starter: {passing}"
        assert all(re.search(r"NotImplementedError", o.message) for o in mine), \
            f"exercise {ex.number}: a starter test fails for another reason: " + \
            "; ".join(o.message for o in mine if "NotImplementedError" not in o.message)


def test_every_graded_test_passes_on_the_solution(solution_outcomes):
    failing = [f"{o.exercise} {o.name}: {o.message}" for o in solution_outcomes if not o.passed]
    assert not failing, "solutions fail graded tests:\n" + "\n".join(failing)
    assert {o.exercise for o in solution_outcomes} == {ex.number for ex in EXERCISES}


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_lab_allows_root_only_for_root():
    """JupyterLab refuses to run as root without --allow-root; `make lab` passes it for uid 0 only."""

    def lab_command(uid):
        out = subprocess.run(["make", "-n", "lab", f"LAB_UID={uid}"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        return [line for line in out.splitlines() if "jupyter lab" in line][-1]

    assert "--allow-root" in lab_command(0)
    assert "--allow-root" not in lab_command(1000)
