# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Appendix A: How the exercises are graded
#
# Every chapter ends with exercises. Each one is a small Python module you edit in
# `exercises/chNN/`, next to a file of graded tests. This appendix builds the grader,
# `looplm.grade`, that runs those tests and prints a score table. It is plumbing, but short
# plumbing worth reading once: knowing exactly what "passed" means makes the score honest.
#
# The layout, for exercise 1.1 of chapter 1:
#
# | file | what it is |
# |---|---|
# | `exercises/ch01/ex1_rmsnorm.py` | the starter you edit; its first docstring line is `Exercise 1.1: RMSNorm` |
# | `exercises/ch01/test_ex1_rmsnorm.py` | the graded tests |
# | `exercises/solutions/ch01/ex1_rmsnorm.py` | a reference solution (read it after you try!) |
#
# Until you write it, a starter raises `NotImplementedError("Exercise 1.1: …")`, so every
# graded test fails at first. That is checked for every exercise by the book's own test suite,
# together with the converse: every test passes on the reference solution.

# %%
#| default_exp grade
#| export
import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

SOURCE_VARIABLE = "LOOPLM_EXERCISE_SOURCE"  # "reader" (default) or "solutions"
SOURCES = ("reader", "solutions")

# %% [markdown]
# ## Finding the module under test
#
# A graded test never imports the exercise by name. It asks for it:
#
# ```python
# from looplm.grade import load_exercise
# ex = load_exercise(__file__)
# ```
#
# `load_exercise` maps the test file `exercises/ch01/test_ex1_rmsnorm.py` to the module
# `exercises/ch01/ex1_rmsnorm.py` (yours) or to `exercises/solutions/ch01/ex1_rmsnorm.py` when
# the environment variable `LOOPLM_EXERCISE_SOURCE` is `solutions`. The same tests can then
# grade both, and the module is loaded fresh from its file every time, so an edit you just
# saved is what gets graded.

# %%
#| export
def load_exercise(test_file, source=None):
    """The module a graded test checks: the reader's version or the reference solution.

    `test_file` is the test's own `__file__` (`exercises/chNN/test_<name>.py`); `source` is
    "reader" or "solutions" and defaults to the `LOOPLM_EXERCISE_SOURCE` variable.
    """
    source = source or os.environ.get(SOURCE_VARIABLE, "reader")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    test_path = Path(test_file).resolve()
    if not test_path.name.startswith("test_"):
        raise ValueError(f"test_file must be a graded test file named test_*.py, got {test_path.name!r}")
    chapter, name = test_path.parent.name, test_path.stem[len("test_"):]
    if source == "solutions":
        path = test_path.parent.parent / "solutions" / chapter / f"{name}.py"
    else:
        path = test_path.parent / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no exercise module {path} for the tests in {test_path.name}")
    spec = importlib.util.spec_from_file_location(f"exercise_{chapter}_{name}_{source}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# %% [markdown]
# ## Discovering the exercises
#
# An exercise is any `exercises/chNN/exK_<slug>.py` with a matching `test_exK_<slug>.py`. Its
# number and title come from the first line of the module's docstring, so the table speaks the
# chapter's language. The book's folder is found by walking up from the current directory (a
# notebook runs in `book/`), or from the `LOOPLM_ROOT` variable.

# %%
#| export
@dataclass
class Exercise:
    """One exercise: its number ("1.1"), title, the module a reader edits and its graded tests."""

    number: str
    title: str
    module: Path
    tests: Path


def find_root(start=None):
    """The book's top folder: the first parent holding `exercises/` and `pyproject.toml`."""
    if os.environ.get("LOOPLM_ROOT"):
        return Path(os.environ["LOOPLM_ROOT"]).resolve()
    here = Path(start or Path.cwd()).resolve()
    candidates = [here, *here.parents]
    if "__file__" in globals():  # in the installed package: the checkout it was installed from
        candidates.append(Path(__file__).resolve().parents[1])
    for folder in candidates:
        if (folder / "exercises").is_dir() and (folder / "pyproject.toml").is_file():
            return folder
    raise FileNotFoundError("cannot find the book's exercises/ folder: run from inside the "
                            "repository or set LOOPLM_ROOT")


def find_exercises(chapter=None, root=None):
    """Exercises of one chapter ("ch01", "1" or 1), or of every chapter, in book order."""
    root = Path(root) if root else find_root()
    if chapter is None:
        folders = sorted(p for p in (root / "exercises").glob("ch[0-9][0-9]") if p.is_dir())
    else:
        text = str(chapter).lower().removeprefix("ch")
        if not text.isdigit():
            raise ValueError(f"chapter must look like 'ch01' or 1, got {chapter!r}")
        folders = [root / "exercises" / f"ch{int(text):02d}"]
        if not folders[0].is_dir():
            known = sorted(p.name for p in (root / "exercises").glob("ch[0-9][0-9]"))
            raise ValueError(f"no exercises for chapter {chapter!r}; chapters with exercises: {known}")
    found = []
    for folder in folders:
        for module in sorted(folder.glob("ex[0-9]*_*.py")):
            tests = folder / f"test_{module.name}"
            doc = (_docstring(module) or "").strip().splitlines()
            head = doc[0] if doc else ""
            if not head.startswith("Exercise ") or ":" not in head:
                raise ValueError(f"{module}: the docstring must start with 'Exercise N.K: title'")
            number, title = head[len("Exercise "):].split(":", 1)
            found.append(Exercise(number.strip(), title.strip(), module, tests))
    return found


def _docstring(path):
    import ast

    return ast.get_docstring(ast.parse(Path(path).read_text(encoding="utf-8")))

# %% [markdown]
# Let us try `load_exercise` on the first exercise of chapter 1: the starter really is a
# starter, and the solution is a different file.

# %%
root = find_root()
test_file = root / "exercises" / "ch01" / "test_ex1_rmsnorm.py"
starter = load_exercise(test_file, source="reader")
solution = load_exercise(test_file, source="solutions")
print(starter.__doc__.splitlines()[0])
print("solution module:", Path(solution.__file__).relative_to(root).as_posix())

# %%
for exercise in find_exercises():
    print(exercise.number, exercise.title, "->", exercise.tests.name)

# %% [markdown]
# ## Running the tests
#
# The grader runs pytest in a separate process (so a half-finished exercise cannot break the
# notebook you graded it from) and asks pytest for a JUnit XML report, which lists every test
# with its outcome and, for a failure, the exception. A test file that fails to import (a
# syntax error in your module, say) counts every test of that exercise as failed.

# %%
#| export
@dataclass
class GradedTest:
    """One graded test: its exercise, name, whether it passed, and the first line of the failure."""

    exercise: str
    name: str
    passed: bool
    message: str = ""


def run_exercise_tests(exercises, source="reader", timeout=900):
    """Run the graded tests of `exercises` against `source`; one GradedTest per test."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if not exercises:
        return []
    env = dict(os.environ, **{SOURCE_VARIABLE: source})
    root = exercises[0].tests.resolve().parents[2]  # exercises/chNN/test_*.py -> the book
    by_file = {ex.tests.resolve(): ex for ex in exercises}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   "--import-mode=importlib", "-o", "junit_family=xunit1", f"--rootdir={root}",
                   f"--junitxml={report}", *[str(p) for p in by_file]]
        subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
        if not report.exists():
            raise RuntimeError("pytest produced no report; run the tests by hand: " + " ".join(command))
        tree = ET.parse(report)
    outcomes = []
    seen = set()
    for case in tree.iter("testcase"):
        exercise = by_file.get((root / case.get("file", "")).resolve())
        if exercise is None:
            continue
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        skipped = case.find("skipped") is not None
        message = ""
        if problem is not None:
            message = (problem.get("message") or problem.text or "").strip().splitlines()[0][:200]
        elif skipped:
            message = "skipped"
        outcomes.append(GradedTest(exercise.number, case.get("name"),
                                    problem is None and not skipped, message))
        seen.add(exercise.number)
    for exercise in exercises:  # a file that could not even be collected
        if exercise.number not in seen:
            outcomes.append(GradedTest(exercise.number, exercise.tests.name, False,
                                        "the test file could not be imported"))
    return outcomes

# %% [markdown]
# ## The score table
#
# An exercise's score is the fraction of its graded tests that pass. The table shows, for
# each failing exercise, the first failure, which is usually all you need to know what to do
# next (`NotImplementedError: Exercise 1.2: …` means you have not started).

# %%
#| export
@dataclass
class GradeReport:
    """What `grade` found: the exercises graded and the outcome of each of their tests."""

    source: str
    exercises: list
    outcomes: list = field(default_factory=list)

    def score(self, number):
        mine = [o for o in self.outcomes if o.exercise == number]
        return sum(o.passed for o in mine), len(mine)

    @property
    def passed(self):
        return sum(o.passed for o in self.outcomes)

    @property
    def total(self):
        return len(self.outcomes)

    def table(self):
        whose = "reference solutions" if self.source == "solutions" else "your exercises"
        lines = [f"Grading {whose}", f"  {'exercise':<9} {'title':<36} {'tests':>7} {'score':>6}"]
        for ex in self.exercises:
            passed, total = self.score(ex.number)
            pct = f"{100 * passed // total}%" if total else "-"
            lines.append(f"  {ex.number:<9} {ex.title[:36]:<36} {f'{passed}/{total}':>7} {pct:>6}")
            failures = [o for o in self.outcomes if o.exercise == ex.number and not o.passed]
            if failures:
                lines.append(f"  {'':<9} first failure: {failures[0].name}: {failures[0].message[:90]}")
        pct = f"{100 * self.passed // self.total}%" if self.total else "-"
        lines.append(f"  {'total':<9} {'':<36} {f'{self.passed}/{self.total}':>7} {pct:>6}")
        return "\n".join(lines)

    def __repr__(self):
        return f"GradeReport({self.passed}/{self.total} graded tests passed)"


def grade(chapter=None, solutions=False, root=None, show=True):
    """Grade the exercises of one chapter (e.g. "ch01") or of all chapters; print the table."""
    exercises = find_exercises(chapter, root)
    source = "solutions" if solutions else "reader"
    report = GradeReport(source, exercises, run_exercise_tests(exercises, source))
    if show:
        print(report.table())
    return report

# %% [markdown]
# Here is the grader on the chapter 1 starters as shipped, then on the reference solutions.
# Your own table will change as you work.

# %%
report = grade("ch01")

# %%
report = grade("ch01", solutions=True)

# %% [markdown]
# ## From the command line
#
# `make grade` runs `python -m looplm.grade`, which grades every chapter; name chapters to
# grade only those (`python -m looplm.grade ch01`), and add `--solutions` to grade the
# reference solutions. The exit status is 0 even when tests fail, because an unfinished
# exercise is not an error; pass `--strict` to get a failing status instead.

# %%
#| export
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m looplm.grade",
                                     description="Grade the book's exercises.")
    parser.add_argument("chapters", nargs="*", help="chapters to grade, e.g. ch01 (default: all)")
    parser.add_argument("--solutions", action="store_true", help="grade the reference solutions")
    parser.add_argument("--strict", action="store_true", help="exit 1 unless every test passes")
    args = parser.parse_args(argv)
    reports = [grade(c, args.solutions) for c in (args.chapters or [None])]
    ok = all(r.passed == r.total for r in reports)
    return 0 if ok or not args.strict else 1


if __name__ == "__main__" and "get_ipython" not in globals():  # a notebook is "__main__" too
    sys.exit(main())

# %% [markdown]
# ## Tests
#
# The grader's own tests use a throwaway book with one exercise, so they do not depend on
# the real exercises.

# %% tags=["nbval-check-output"]
#| test
import tempfile
import textwrap
from pathlib import Path

import pytest

from looplm.testing import run_tests


def _toy_book(folder, solved):
    ch = Path(folder) / "exercises" / "ch07"
    ch.mkdir(parents=True)
    (ch.parent / "solutions" / "ch07").mkdir(parents=True)
    (Path(folder) / "pyproject.toml").write_text("")
    starter = '"""Exercise 7.1: Double it."""\ndef double(x):\n    raise NotImplementedError("Exercise 7.1")\n'
    answer = '"""Exercise 7.1: Double it."""\ndef double(x):\n    return 2 * x\n'
    (ch / "ex1_double.py").write_text(answer if solved else starter)
    (ch.parent / "solutions" / "ch07" / "ex1_double.py").write_text(answer)
    (ch / "test_ex1_double.py").write_text(textwrap.dedent('''
        from looplm.grade import load_exercise
        ex = load_exercise(__file__)
        def test_small(): assert ex.double(2) == 4
        def test_negative(): assert ex.double(-3) == -6
    '''))
    return Path(folder)


def test_starter_scores_zero_and_solution_full():
    with tempfile.TemporaryDirectory() as tmp:
        root = _toy_book(tmp, solved=False)
        starter = grade("ch07", root=root, show=False)
        solution = grade("ch07", solutions=True, root=root, show=False)
    assert (starter.passed, starter.total) == (0, 2)
    assert "NotImplementedError" in starter.outcomes[0].message
    assert (solution.passed, solution.total) == (2, 2)


def test_reader_edits_are_graded():
    with tempfile.TemporaryDirectory() as tmp:
        report = grade(7, root=_toy_book(tmp, solved=True), show=False)
    assert report.score("7.1") == (2, 2)
    assert "7.1" in report.table() and "100%" in report.table()


def test_bad_arguments():
    with tempfile.TemporaryDirectory() as tmp:
        root = _toy_book(tmp, solved=False)
        with pytest.raises(ValueError, match="no exercises for chapter"):
            find_exercises("ch99", root)
        with pytest.raises(ValueError, match="chapter must look like"):
            find_exercises("chapter one", root)
        with pytest.raises(ValueError, match="source must be one of"):
            load_exercise(root / "exercises" / "ch07" / "test_ex1_double.py", source="mine")


run_tests(test_starter_scores_zero_and_solution_full, test_reader_edits_are_graded, test_bad_arguments)
