# Generated from book/90_appendix_grader.py: edit the chapter, then run `make export`.

import contextlib
import io
import os
import re
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from looplm.grade import (  # noqa: F401
    SOURCE_VARIABLE,
    SOURCES,
    DEFAULT_TIMEOUT,
    load_exercise,
    exercise_module,
    Exercise,
    find_root,
    find_exercises,
    GradedTest,
    run_exercise_tests,
    GradeReport,
    grade,
    main,
)
from looplm.testing import run_tests

# --- book/90_appendix_grader.py:572 (cell 19) ---
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

# --- book/90_appendix_grader.py:631 (cell 20) ---
# Toy graded tests load their module straight from its file (not through looplm, whose import
# takes seconds), so that each exercise's process is quick next to the time limits used here.
LOAD_MODULE = textwrap.dedent("""
    import importlib.util, pathlib
    path = pathlib.Path(__file__).with_name(pathlib.Path(__file__).name[len("test_"):])
    spec = importlib.util.spec_from_file_location(path.stem, path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    def test_small(): assert ex.double(2) == 4
    def test_negative(): assert ex.double(-3) == -6
""")
WORKING = '"""Exercise 7.1: Double it."""\ndef double(x):\n    return 2 * x\n'


def _chapter_with(folder, **modules):
    """A throwaway book whose chapter 7 holds a working exercise 7.1 and `modules` (name=source)."""
    ch = Path(folder) / "exercises" / "ch07"
    ch.mkdir(parents=True)
    (Path(folder) / "pyproject.toml").write_text("")
    for name, source in {"ex1_double": WORKING, **modules}.items():
        (ch / f"{name}.py").write_text(source)
        (ch / f"test_{name}.py").write_text(LOAD_MODULE)
    return Path(folder)


def _messages(report, number):
    return {o.message for o in report.outcomes if o.exercise == number}


@contextlib.contextmanager
def _book_root(root):
    """LOOPLM_ROOT set to `root` for the block, as `python -m looplm.grade` would see it."""
    old = os.environ.get("LOOPLM_ROOT")
    os.environ["LOOPLM_ROOT"] = str(root)
    try:
        yield
    finally:
        if old is None:
            del os.environ["LOOPLM_ROOT"]
        else:
            os.environ["LOOPLM_ROOT"] = old


def _command_line(*argv):
    """main(argv) in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(argv))
        except SystemExit as exit:
            status = exit.code
    return status, out.getvalue(), err.getvalue()


def _running(pid):
    """Whether process `pid` still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] not in ("Z", "X")


def test_a_syntax_error_fails_only_its_exercise():
    broken = '"""Exercise 7.2: Broken."""\ndef double(x)\n    return 2 * x\n'
    with tempfile.TemporaryDirectory() as tmp:
        report = grade("ch07", root=_chapter_with(tmp, ex2_broken=broken), show=False)
    assert report.score("7.1") == (2, 2)
    assert report.score("7.2") == (0, 2)
    (message,) = _messages(report, "7.2")
    assert re.fullmatch(r"could not be imported: SyntaxError: .+ \(ex2_broken\.py, line 2\)", message), message


def test_an_exercise_without_its_docstring_is_graded_under_its_file_name():
    nameless = "def double(x):\n    return 2 * x\n"
    with tempfile.TemporaryDirectory() as tmp:
        root = _chapter_with(tmp, ex2_double_again=nameless)
        exercise = find_exercises(7, root)[1]
        report = grade("ch07", root=root, show=False)
    assert (exercise.number, exercise.title) == ("7.2", "Double again")
    assert "no 'Exercise 7.2: title' docstring" in exercise.warning
    assert report.score("7.1") == (2, 2) and report.score("7.2") == (2, 2)
    assert "warning: ex2_double_again.py has no 'Exercise 7.2: title' docstring" in report.table()


def test_an_early_exit_fails_only_its_exercise():
    exits = '"""Exercise 7.2: Exits."""\nimport os\ndef double(x):\n    os._exit(0)\n'
    with tempfile.TemporaryDirectory() as tmp:
        report = grade("ch07", root=_chapter_with(tmp, ex2_exits=exits), show=False)
    assert report.score("7.1") == (2, 2)
    assert report.score("7.2") == (0, 2)
    assert _messages(report, "7.2") == {"the test process exited early with status 0"}


def test_an_endless_loop_times_out_and_its_processes_are_killed():
    loops = textwrap.dedent('''
        """Exercise 7.2: Loops."""
        import pathlib, subprocess, sys
        def double(x):
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            pathlib.Path(__file__).with_name("child.pid").write_text(str(child.pid))
            while True:
                pass
    ''')
    with tempfile.TemporaryDirectory() as tmp:
        root = _chapter_with(tmp, ex2_loops=loops)
        with _book_root(root):
            # 10 s: ample for the working exercise even on a loaded machine, and still a timeout
            status, out, err = _command_line("ch07", "--timeout", "10")
        assert status == 0, err
        child = int((root / "exercises" / "ch07" / "child.pid").read_text())
    rows = {line.split()[0]: line for line in out.splitlines()[2:] if line.split()[0][0].isdigit()}
    assert rows["7.1"].split()[-2:] == ["2/2", "100%"]
    assert rows["7.2"].split()[-2:] == ["0/2", "0%"]
    assert "first failure: test_small: timed out after 10 s" in out
    if Path("/proc/self/stat").exists():  # the process the exercise started is gone too
        deadline = time.monotonic() + 10
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(child), f"process {child} started by the exercise still runs"


def test_command_line_errors_exit_2_before_grading():
    with tempfile.TemporaryDirectory() as tmp:
        with _book_root(_chapter_with(tmp)):
            unknown = _command_line("ch07", "ch99")
            malformed = _command_line("abc")
            bad_timeouts = [_command_line("ch07", "--timeout", t) for t in ("0", "-5", "soon", "nan")]
    status, out, err = unknown
    assert (status, out) == (2, "")
    assert "error: no exercises for chapter 'ch99'; chapters with exercises: ch07" in err
    status, out, err = malformed
    assert (status, out) == (2, "")
    assert "error: chapter must look like 'ch01' or 1, got 'abc'" in err
    for status, out, err in bad_timeouts:
        assert (status, out) == (2, "")
        assert "error: argument --timeout: must be a positive number of seconds" in err
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        grade("ch07", timeout=0)
