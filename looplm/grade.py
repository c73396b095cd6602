# Generated from book/90_appendix_grader.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['SOURCE_VARIABLE', 'SOURCES', 'load_exercise', 'Exercise', 'find_root', 'find_exercises', 'GradedTest', 'run_exercise_tests', 'GradeReport', 'grade', 'main']
# fmt: on

# --- book/90_appendix_grader.py, cell 1 ---
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

# --- book/90_appendix_grader.py, cell 3 ---
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

# --- book/90_appendix_grader.py, cell 5 ---
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

# --- book/90_appendix_grader.py, cell 10 ---
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

# --- book/90_appendix_grader.py, cell 12 ---
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

# --- book/90_appendix_grader.py, cell 17 ---
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
