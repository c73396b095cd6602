# Generated from book/90_appendix_grader.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['SOURCE_VARIABLE', 'SOURCES', 'DEFAULT_TIMEOUT', 'load_exercise', 'exercise_module', 'Exercise', 'find_root', 'find_exercises', 'GradedTest', 'run_exercise_tests', 'GradeReport', 'grade', 'main']
# fmt: on

import argparse
import ast
import importlib.util
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from looplm.checks import require_bool, require_int

# --- book/90_appendix_grader.py:37 (cell 1) ---
SOURCE_VARIABLE = "LOOPLM_EXERCISE_SOURCE"  # "reader" (default) or "solutions"
SOURCES = ("reader", "solutions")
DEFAULT_TIMEOUT = 60.0  # seconds each exercise's tests may run

# --- book/90_appendix_grader.py:78 (cell 3) ---
def load_exercise(test_file, source=None):
    """The module a graded test checks: the reader's version or the reference solution.

    `test_file` is the test's own `__file__` (`exercises/chNN/test_<name>.py`); `source` is
    "reader" or "solutions" and defaults to the `LOOPLM_EXERCISE_SOURCE` variable.
    """
    source = source or os.environ.get(SOURCE_VARIABLE, "reader")
    path = exercise_module(test_file, source)
    if not path.is_file():
        raise FileNotFoundError(f"no exercise module {path} for the tests in {Path(test_file).name}")
    chapter, name = path.parent.name, path.stem
    spec = importlib.util.spec_from_file_location(f"exercise_{chapter}_{name}_{source}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exercise_module(test_file, source="reader"):
    """The path of the module that the graded tests in `test_file` check, for `source`."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    test_path = Path(test_file).resolve()
    if not test_path.name.startswith("test_"):
        raise ValueError(f"test_file must be a graded test file named test_*.py, got {test_path.name!r}")
    chapter, name = test_path.parent.name, test_path.stem[len("test_"):]
    if source == "solutions":
        return test_path.parent.parent / "solutions" / chapter / f"{name}.py"
    return test_path.parent / f"{name}.py"

# --- book/90_appendix_grader.py:119 (cell 5) ---
@dataclass
class Exercise:
    """One exercise: its number ("1.1"), title, the module a reader edits and its graded tests.

    `warning` is non-empty when the module's docstring does not name the exercise, so the
    number and title were made from the file name.
    """

    number: str
    title: str
    module: Path
    tests: Path
    warning: str = ""


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
    folders = sorted(p for p in (root / "exercises").glob("ch[0-9][0-9]") if p.is_dir())
    if chapter is not None:
        text = str(chapter).strip().lower().removeprefix("ch")
        if not (text.isascii() and text.isdigit()):
            raise ValueError(f"chapter must look like 'ch01' or 1, got {chapter!r}")
        wanted = root / "exercises" / f"ch{int(text):02d}"
        if wanted not in folders:
            known = ", ".join(p.name for p in folders if any(p.glob("ex[0-9]*_*.py"))) or "none"
            raise ValueError(f"no exercises for chapter {chapter!r}; chapters with exercises: {known}")
        folders = [wanted]
    found = []
    for folder in folders:
        for module in sorted(folder.glob("ex[0-9]*_*.py")):
            found.append(_exercise(module, folder / f"test_{module.name}"))
    return found


def _exercise(module, tests):
    """The Exercise for `module`, named by its docstring or, failing that, by its file name."""
    try:
        doc = ast.get_docstring(ast.parse(module.read_bytes(), filename=str(module))) or ""
    except (SyntaxError, ValueError):  # grading reports it; here it only costs the name
        doc = None
    head = doc.strip().splitlines()[0] if doc and doc.strip() else ""
    match = re.fullmatch(r"Exercise\s+(\S+?)\s*:\s*(.+)", head)
    if match:
        return Exercise(match[1], match[2].strip(), module, tests)
    digits = re.match(r"ex(\d+)[^_]*_(.*)", module.stem)
    slug = digits[2].replace("_", " ").strip() or module.stem
    number = f"{int(module.parent.name[2:])}.{int(digits[1])}"
    warning = "" if doc is None else (f"{module.name} has no 'Exercise {number}: title' docstring; "
                                      "named from its file")
    return Exercise(number, slug[0].upper() + slug[1:], module, tests, warning)

# --- book/90_appendix_grader.py:216 (cell 10) ---
@dataclass
class GradedTest:
    """One graded test: its exercise, name, whether it passed, and the first line of the failure."""

    exercise: str
    name: str
    passed: bool
    message: str = ""


def run_exercise_tests(exercises, source="reader", timeout=DEFAULT_TIMEOUT, jobs=None, isolate=True):
    """Run the graded tests of `exercises` against `source`; one GradedTest per test.

    Each exercise's tests run in a process of their own, stopped after `timeout` seconds
    (None: no limit); `jobs` processes run at a time (default: up to 4, one per CPU).
    isolate=False runs the exercises in `jobs` processes in all, each allowed `timeout` seconds
    per exercise it runs: much faster (Python and torch start once per process, not once per
    exercise), for code that is known to behave, such as the starters and the solutions. A
    crash or a hang there costs every exercise of its process.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    timeout = _check_timeout(timeout)
    if jobs is None:
        jobs = min(4, os.cpu_count() or 1)
    require_int("jobs", jobs, 1)
    require_bool("isolate", isolate)
    if not exercises:
        return []
    exercises = list(exercises)
    groups = [[ex] for ex in exercises] if isolate else [exercises[i::jobs] for i in range(jobs)]
    groups = [group for group in groups if group]
    stop = threading.Event()  # set on Ctrl-C: every running test process is killed
    with ThreadPoolExecutor(max_workers=min(jobs, len(groups))) as pool:
        try:
            runs = list(pool.map(lambda group: _grade_together(group, source, timeout, stop), groups))
        except BaseException:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    by_exercise = {number: outcomes for run in runs for number, outcomes in run.items()}
    return [outcome for ex in exercises for outcome in by_exercise[ex.number]]


def _check_timeout(timeout):
    if timeout is None:
        return None
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout) or timeout <= 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _failed(exercise, message):
    """Every graded test of `exercise` fails with `message`."""
    return [GradedTest(exercise.number, name, False, message) for name in _test_names(exercise.tests.resolve())]


def _grade_together(exercises, source, timeout, stop):
    """{exercise number: its GradedTests}, from one pytest process over their test files."""
    results, runnable = {}, []
    for exercise in exercises:
        tests = exercise.tests.resolve()
        problem = _syntax_problem(exercise_module(tests, source))
        if not tests.is_file():
            results[exercise.number] = [GradedTest(exercise.number, tests.name, False,
                                                   f"no graded tests file {tests.name}")]
        elif problem:
            results[exercise.number] = _failed(exercise, f"could not be imported: {problem}")
        else:
            runnable.append(exercise)
    if not runnable:
        return results
    root = runnable[0].tests.resolve().parents[2]  # exercises/chNN/test_*.py -> the book
    env = dict(os.environ, **{SOURCE_VARIABLE: source})
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        # no:nbval: the notebook plugin is slow to import and has nothing to do here
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:nbval",
                   "--import-mode=importlib", "-o", "junit_family=xunit1", f"--rootdir={root}",
                   f"--junitxml={report}", *[str(ex.tests.resolve()) for ex in runnable]]
        limit = None if timeout is None else timeout * len(runnable)
        status = _run_with_limit(command, env, root, Path(tmp) / "output.txt", limit, stop)
        if status is None:
            return {**results, **{ex.number: _failed(ex, f"timed out after {limit:g} s") for ex in runnable}}
        if not report.exists():
            return {**results, **{ex.number: _failed(ex, f"the test process exited early with "
                                                         f"{_describe_status(status)}") for ex in runnable}}
        try:
            cases = list(ET.parse(report).iter("testcase"))
        except ET.ParseError:
            return {**results, **{ex.number: _failed(ex, "the test process left an unreadable report")
                                  for ex in runnable}}
    for exercise in runnable:
        results[exercise.number] = _outcomes(exercise, [case for case in cases
                                                        if _case_file(case, root) == exercise.tests.resolve()])
    return results


def _case_file(case, root):
    """The test file a JUnit testcase came from (xunit1 reports name it relative to the root)."""
    if case.get("file"):
        return (root / case.get("file")).resolve()
    module = (case.get("classname") or "").split(".")            # a collection failure: no file
    return (root / Path(*module).with_suffix(".py")).resolve() if module != [""] else None


def _outcomes(exercise, cases):
    """An exercise's GradedTests from its JUnit testcases."""
    outcomes = []
    for case in cases:
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None and problem.get("message") == "collection failure":
            return _failed(exercise, f"could not be imported: {_last_exception(problem.text or '')}")
        skipped = case.find("skipped") is not None
        message = ""
        if problem is not None:
            message = ((problem.get("message") or problem.text or "").strip().splitlines() or [""])[0][:200]
        elif skipped:
            message = "skipped"
        outcomes.append(GradedTest(exercise.number, case.get("name"),
                                   problem is None and not skipped, message))
    return outcomes or [GradedTest(exercise.number, exercise.tests.name, False, "pytest found no graded tests")]


def _run_with_limit(command, env, cwd, log, timeout, stop):
    """Run `command` with its output in `log`: its exit status, or None past `timeout` seconds.

    The command starts a process group of its own, so that a timeout (or `stop` being set, on
    Ctrl-C) kills it together with every process it started.
    """
    if stop.is_set():
        raise KeyboardInterrupt
    if os.name == "posix":
        group = {"start_new_session": True}
    else:
        group = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    deadline = None if timeout is None else time.monotonic() + timeout
    with open(log, "wb") as output:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                   stdout=output, stderr=subprocess.STDOUT, **group)
        try:
            while not stop.is_set():
                left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if left <= 0:
                    return process.poll()  # None: still running
                try:
                    return process.wait(timeout=left)
                except subprocess.TimeoutExpired:
                    pass
            raise KeyboardInterrupt
        finally:
            if process.poll() is None:  # still running: timed out or interrupted
                _kill_tree(process)


def _kill_tree(process):
    if os.name == "posix":
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    else:
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True)
        process.kill()
    process.wait()


def _describe_status(status):
    if status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"status {status}"


def _syntax_problem(path):
    """'SyntaxError: invalid syntax (ex1_rmsnorm.py, line 3)' if `path` does not compile, else ''."""
    try:
        compile(Path(path).read_bytes(), str(path), "exec", dont_inherit=True)
    except SyntaxError as error:
        return f"{type(error).__name__}: {error.msg} ({Path(path).name}, line {error.lineno})"
    except (OSError, ValueError):  # missing or unreadable: the test run says why
        return ""
    return ""


def _last_exception(text):
    """The exception line ("NameError: name 'x' is not defined") of a pytest traceback."""
    lines = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    named = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", line)]
    return (named or lines or ["an error while collecting its tests"])[-1][:200]


def _test_names(tests):
    """The graded tests a test file defines (test_* functions and Test* class methods)."""
    try:
        tree = ast.parse(Path(tests).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return [Path(tests).name]
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            names.append(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names += [item.name for item in node.body
                      if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and item.name.startswith("test")]
    return names or [Path(tests).name]

# --- book/90_appendix_grader.py:438 (cell 12) ---
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
            if ex.warning:
                lines.append(f"  {'':<9} warning: {ex.warning}")
            failures = [o for o in self.outcomes if o.exercise == ex.number and not o.passed]
            if failures:
                lines.append(f"  {'':<9} first failure: {failures[0].name}: {failures[0].message[:90]}")
        pct = f"{100 * self.passed // self.total}%" if self.total else "-"
        lines.append(f"  {'total':<9} {'':<36} {f'{self.passed}/{self.total}':>7} {pct:>6}")
        return "\n".join(lines)

    def __repr__(self):
        return f"GradeReport({self.passed}/{self.total} graded tests passed)"


def grade(chapter=None, solutions=False, root=None, show=True, timeout=DEFAULT_TIMEOUT, jobs=None):
    """Grade the exercises of one chapter (e.g. "ch01") or of all chapters; print the table.

    `timeout` is each exercise's time limit in seconds (None: none); `jobs` how many exercises
    are graded at once (see `run_exercise_tests`).
    """
    timeout = _check_timeout(timeout)
    exercises = find_exercises(chapter, root)
    source = "solutions" if solutions else "reader"
    report = GradeReport(source, exercises, run_exercise_tests(exercises, source, timeout, jobs))
    if show:
        print(report.table())
    return report

# --- book/90_appendix_grader.py:515 (cell 17) ---
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m looplm.grade",
                                     description="Grade the book's exercises.")
    parser.add_argument("chapters", nargs="*", help="chapters to grade, e.g. ch01 (default: all)")
    parser.add_argument("--solutions", action="store_true", help="grade the reference solutions")
    parser.add_argument("--strict", action="store_true", help="exit 1 unless every test passes")
    parser.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"time limit for each exercise's tests (default: {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                        help="exercises graded at once (default: up to 4, one per CPU)")
    args = parser.parse_args(argv)
    chapters = args.chapters or [None]
    try:
        for chapter in chapters:  # every name is checked before anything is graded
            find_exercises(chapter)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    try:
        reports = [grade(c, args.solutions, timeout=args.timeout, jobs=args.jobs) for c in chapters]
    except KeyboardInterrupt:  # Ctrl-C: the test processes are already killed
        print("interrupted", file=sys.stderr)
        return 130
    ok = all(r.passed == r.total for r in reports)
    return 0 if ok or not args.strict else 1


def _seconds(text):
    try:
        return _check_timeout(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}") from None


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


if __name__ == "__main__" and "get_ipython" not in globals():  # a notebook is "__main__" too
    sys.exit(main())
