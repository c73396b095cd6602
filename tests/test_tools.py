"""The pipeline's own tools, on a throwaway book: export is deterministic, and the checks catch
a hand-edited generated file, a chapter never exported, and a notebook out of sync."""

import ast
import contextlib
import importlib.util
import io
import re
import shutil
import sys
import textwrap
from types import SimpleNamespace
from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parents[1]

CHAPTER = textwrap.dedent('''\
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
    # # Chapter 7: A toy

    # %%
    #| default_exp toy

    # %%
    #| export
    def double(x):
        return 2 * x

    _private = 1

    # %%
    print("notebook only")

    # %%
    #| test
    def test_double():
        assert double(2) == 4

    test_double()
    ''')


@pytest.fixture()
def book(tmp_path):
    for name in ("export.py", "sync.py"):
        (tmp_path / "tools").mkdir(exist_ok=True)
        shutil.copy(ROOT / "tools" / name, tmp_path / "tools" / name)
    for folder in ("book", "looplm", "kernels", "tests"):
        (tmp_path / folder).mkdir()
    (tmp_path / "looplm" / "__init__.py").write_text("")
    (tmp_path / "book" / "07_toy.py").write_text(CHAPTER)
    return tmp_path


def run(book, tool, *args):
    """Run tools/<tool> of the throwaway book in this process (its ROOT is the throwaway book)."""
    spec = importlib.util.spec_from_file_location(f"tool_{tool[:-3]}", book / "tools" / tool)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.main(list(args)) if tool == "export.py" else module.main()
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_export_writes_module_and_tests_with_provenance(book):
    assert run(book, "export.py").returncode == 0
    module = (book / "looplm" / "toy.py").read_text()
    assert module.startswith("# Generated from book/07_toy.py")
    assert "__all__ = ['double']" in module  # _private is not public
    assert "# --- book/07_toy.py:22 (cell 2) ---" in module  # line 22 of the chapter: `def double`
    assert "notebook only" not in module
    tests = (book / "tests" / "test_07_toy.py").read_text()
    assert "from looplm.toy import (" in tests and "def test_double" in tests
    assert "test_double()" not in tests.replace("def test_double()", "")  # the call stays in the notebook


def test_an_appendix_part_extends_a_module_between_chapters(book):
    """book/07a_slug.py sorts after chapter 7 and before chapter 8: the module is built from
    chapter 7, then extended by the appendix part, then by chapter 8."""
    part = CHAPTER.replace("# # Chapter 7: A toy", "# # Appendix C, continued: a toy").replace(
        "#| default_exp toy", "#| default_exp toy").replace("def double(x):\n    return 2 * x", "def triple(x):\n    return 3 * x")
    part = part.replace("def test_double():\n    assert double(2) == 4\n\ntest_double()", "def test_triple():\n    assert triple(2) == 6")
    later = part.replace("Appendix C, continued: a toy", "Chapter 8: More toy").replace("triple", "quadruple").replace(
        "3 * x", "4 * x").replace("== 6", "== 8")
    (book / "book" / "07a_toy_part.py").write_text(part)
    (book / "book" / "08_more_toy.py").write_text(later)
    assert run(book, "export.py").returncode == 0, "export failed"
    module = (book / "looplm" / "toy.py").read_text()
    assert module.startswith("# Generated from book/07_toy.py, book/07a_toy_part.py, book/08_more_toy.py")
    assert module.index("def double") < module.index("def triple") < module.index("def quadruple")
    assert (book / "tests" / "test_07a_toy_part.py").is_file()


def test_export_is_deterministic_and_check_passes(book):
    run(book, "export.py")
    first = {p: p.read_text() for p in book.rglob("*.py")}
    assert run(book, "export.py").stdout == ""  # nothing to write the second time
    assert {p: p.read_text() for p in book.rglob("*.py")} == first
    assert run(book, "export.py", "--check").returncode == 0


def test_check_catches_a_hand_edited_generated_file(book):
    run(book, "export.py")
    with (book / "looplm" / "toy.py").open("a") as f:
        f.write("x = 1\n")
    result = run(book, "export.py", "--check")
    assert result.returncode == 1 and "looplm/toy.py differs" in result.stderr


def test_check_catches_a_chapter_never_exported(book):
    result = run(book, "export.py", "--check")
    assert result.returncode == 1 and "looplm/toy.py is missing" in result.stderr


def test_check_catches_a_module_no_chapter_builds(book):
    run(book, "export.py")
    (book / "looplm" / "stray.py").write_text("x = 1\n")
    result = run(book, "export.py", "--check")
    assert result.returncode == 1 and "no chapter builds" in result.stderr


def test_export_rejects_unknown_directives(book):
    chapter = book / "book" / "07_toy.py"
    chapter.write_text(CHAPTER.replace("#| test", "#| tset"))
    result = run(book, "export.py")
    assert result.returncode == 1 and "unknown directive" in result.stderr


def test_sync_check(book):
    chapter = book / "book" / "07_toy.py"
    result = run(book, "sync.py")
    assert result.returncode == 1 and "no executed notebook" in result.stderr
    notebook = jupytext.read(chapter)
    for i, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            cell.execution_count = i
    jupytext.write(notebook, chapter.with_suffix(".ipynb"), fmt="ipynb")
    assert run(book, "sync.py").returncode == 0
    chapter.write_text(CHAPTER.replace("notebook only", "changed"))
    result = run(book, "sync.py")
    assert result.returncode == 1 and "differs from the notebook in its source" in result.stderr


def test_main_guard_goes_last_in_its_module(book):
    chapter = book / "book" / "07_toy.py"
    guard = ('# %%\n#| export\ndef main():\n    return 0\n\n'
             'if __name__ == "__main__" and "get_ipython" not in globals():\n    main()\n\n')
    text = CHAPTER.replace("# %%\nprint(", guard + "# %%\nprint(")
    chapter.write_text(text)
    (book / "book" / "08_more.py").write_text(CHAPTER.split("# %% [markdown]")[0]
                                              + "# %%\n#| export toy\nLATER = 1\n")
    assert run(book, "export.py").returncode == 0
    module = (book / "looplm" / "toy.py").read_text()
    assert module.index("LATER = 1") < module.index("def main") < module.index("__main__")


def test_export_gathers_imports_at_the_top(book):
    """Top-level imports from every cell go to the top once each, grouped stdlib / third party /
    looplm, one `from` statement a module; an import inside a function stays; a cell that held
    only imports loses its banner."""
    cells = textwrap.dedent('''\
        # %%
        #| export
        import math
        from os import (
            sep,
        )

        # %%
        #| export
        from looplm import (  # noqa: F401
            __version__,
        )
        import torch
        from os import path
        import math

        # %%
        #| export
        def half(x):
            import fractions
            return fractions.Fraction(x, 2) * math.pi

        ''')
    (book / "book" / "07_toy.py").write_text(CHAPTER.replace("# %%\nprint(", cells + "# %%\nprint("))
    assert run(book, "export.py").returncode == 0
    module = (book / "looplm" / "toy.py").read_text()
    top = module.split("\n# --- ")[0]
    assert top.endswith("# fmt: on\n\nimport math\nfrom os import path, sep\n\nimport torch\n\n"
                        "from looplm import (  # noqa: F401\n    __version__,\n)\n")  # a comment: as written
    assert module.count("import math") == 1 and "    import fractions" in module
    assert module.count("\n# --- book/07_toy.py") == 2  # double's cell and half's: not the imports' cell


def generated_files():
    for folder in ("looplm", "kernels", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if text.startswith("# Generated from "):
                yield path, text


def test_generated_files_import_at_the_top():
    """In the package and tests as exported: no column-0 import after the first other statement
    (the `__all__` line aside, which comes first)."""
    for path, text in generated_files():
        body = [node for node in ast.parse(text).body if not (
            isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["__all__"])]
        kinds = [isinstance(node, (ast.Import, ast.ImportFrom)) for node in body]
        assert kinds == sorted(kinds, reverse=True), f"{path.name}: an import after other code"


def test_banners_name_the_chapter_line_of_the_cell():
    """Each `# --- book/NN_slug.py:LINE (cell K) ---` names the line that holds the first line of
    cell K's code (its '#|' directives aside), and what follows the banner comes from that cell."""
    banner = re.compile(r"^# --- (book/[^:]+):(\d+) \(cell (\d+)\) ---$", re.M)
    chapters = {}
    checked = 0
    for path, text in generated_files():
        for match in banner.finditer(text):
            chapter, line, cell = match[1], int(match[2]), int(match[3])
            if chapter not in chapters:
                chapters[chapter] = ((ROOT / chapter).read_text(encoding="utf-8").splitlines(),
                                     jupytext.read(ROOT / chapter).cells)
            lines, cells = chapters[chapter]
            source = [s for s in cells[cell].source.splitlines() if not s.startswith("#|")]
            first = next(s for s in source if s)
            assert lines[line - 1] == first, f"{path.name}: {match[0]} but that line is {lines[line - 1]!r}"
            shown = text[match.end():].lstrip("\n").splitlines()[0]
            assert shown in source, f"{path.name}: {match[0]} is followed by {shown!r}, not from that cell"
            checked += 1
    assert checked > 100


TIMED = CHAPTER.split("# %% [markdown]")[0] + textwrap.dedent('''\
    # %% [markdown]
    # # Chapter 7: A timed toy

    # %%
    import time
    SIZE = 3

    # %% tags=["timing"]
    print(SIZE, time.perf_counter_ns())
    ''')


def execute_toy(book, *args):
    spec = importlib.util.spec_from_file_location("tool_execute", book / "tools" / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with contextlib.redirect_stdout(io.StringIO()):
        assert module.main(list(args)) == 0
    cell = jupytext.read(book / "book" / "07_toy.ipynb").cells[-1]
    return "".join(output.get("text", "") for output in cell.outputs)


def test_execute_keeps_unchanged_timings_and_refreshes_changed_ones(book):
    shutil.copy(ROOT / "tools" / "execute.py", book / "tools" / "execute.py")
    chapter = book / "book" / "07_toy.py"
    chapter.write_text(TIMED)
    first = execute_toy(book)
    assert first.startswith("3 ")
    assert execute_toy(book) == first                      # nothing changed: the stored timing stays
    fresh = execute_toy(book, "--fresh-timings")            # asked for: new timings
    assert fresh.startswith("3 ") and fresh != first
    edited = TIMED.replace("# %%\nimport time", "# %% [markdown]\n# Some new prose.\n\n# %%\nimport time")
    assert edited != TIMED
    chapter.write_text(edited)
    assert execute_toy(book) == fresh                      # only prose changed: the timing stays
    chapter.write_text(TIMED.replace("SIZE = 3", "SIZE = 4"))
    assert execute_toy(book).startswith("4 ")               # an earlier cell changed: re-measured


PLOTTED = CHAPTER.split("# %% [markdown]")[0] + textwrap.dedent('''\
    # %% [markdown]
    # # Chapter 7: A plotted toy

    # %%
    import matplotlib.pyplot as plt
    plt.plot([0, 1, 2], [0, 1, 4])
    plt.show()
    ''')


def _png_of_last_cell(book):
    cell = jupytext.read(book / "book" / "07_toy.ipynb").cells[-1]
    return next(o["data"]["image/png"] for o in cell.outputs if "image/png" in o.get("data", {}))


def _store_png_of_last_cell(book, png):
    path = book / "book" / "07_toy.ipynb"
    nb = jupytext.read(path)
    for output in nb.cells[-1].outputs:
        if "image/png" in output.get("data", {}):
            output["data"]["image/png"] = png
    jupytext.write(nb, path, fmt="ipynb")


def _perturbed(png, n_pixels, levels):
    """The PNG with n_pixels pixel values changed by `levels` intensity levels."""
    import base64

    import numpy
    from matplotlib import image

    pixels = image.imread(io.BytesIO(base64.b64decode(png)), format="png")
    pixels = numpy.round(pixels * 255).astype(numpy.int16)
    flat = pixels.reshape(-1)
    flat[:n_pixels] = numpy.clip(flat[:n_pixels] + levels, 0, 255) if levels > 0 else flat[:n_pixels]
    flat[:n_pixels] = numpy.where(flat[:n_pixels] == 255, 255 - abs(levels), flat[:n_pixels])
    out = io.BytesIO()
    image.imsave(out, (pixels / 255).astype(numpy.float32), format="png")
    return base64.b64encode(out.getvalue()).decode()


def test_execute_keeps_a_figure_that_differs_only_by_rounding(book):
    import base64

    shutil.copy(ROOT / "tools" / "execute.py", book / "tools" / "execute.py")
    (book / "book" / "07_toy.py").write_text(PLOTTED)
    execute_toy(book)
    png = _png_of_last_cell(book)
    assert b"Software" not in base64.b64decode(png)         # no matplotlib version in the bytes
    # as if another machine had stored it: 29 pixel values one level off
    near = _perturbed(png, 29, 1)
    assert near != png
    _store_png_of_last_cell(book, near)
    execute_toy(book)
    assert _png_of_last_cell(book) == near                  # the same figure: stored bytes kept
    # a real change (many pixels, large differences) is stored
    far = _perturbed(png, 5000, 60)
    _store_png_of_last_cell(book, far)
    execute_toy(book)
    assert _png_of_last_cell(book) == png
