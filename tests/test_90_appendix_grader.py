# Generated from book/90_appendix_grader.py: edit the chapter, then run `make export`.
from looplm.grade import (  # noqa: F401
    SOURCE_VARIABLE,
    SOURCES,
    load_exercise,
    Exercise,
    find_root,
    find_exercises,
    GradedTest,
    run_exercise_tests,
    GradeReport,
    grade,
    main,
)

# --- book/90_appendix_grader.py, cell 19 ---
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
