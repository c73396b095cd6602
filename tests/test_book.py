"""The rendered book: it builds offline from the stored outputs, every chapter page is there with
its figures and its math, and in a real browser the math is typeset by the local MathJax."""

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
MATHJAX = ROOT / "build" / "static" / "mathjax" / "tex-chtml.js"
SCREENSHOTS = ROOT / "build" / "screenshots"


def toc_files():
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        for chapter in part["chapters"]:
            files += [chapter["file"]] + [section["file"] for section in chapter.get("sections", [])]
    return files


def numbered_chapters():
    return [f for f in toc_files() if re.match(r"\d\d_", f) and not f.startswith("9")]


def chapter_sources():
    """Every chapter and appendix source, by the tools' own rule (tools/export.py's chapter_files)."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from export import chapter_files
    finally:
        sys.path.pop(0)
    return [p.stem for p in chapter_files("py", BOOK)]


@pytest.fixture(scope="module")
def html():
    assert MATHJAX.is_file(), f"{MATHJAX} is missing: `make test` installs it (tools/mathjax.sh)"
    out = Path(tempfile.mkdtemp(prefix="looplm-book-"))
    jb = Path(sys.executable).with_name("jupyter-book")
    result = subprocess.run([str(jb), "build", str(BOOK), "--path-output", str(out), "-W", "-n",
                             "--keep-going"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"book build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    yield out / "_build" / "html"
    shutil.rmtree(out, ignore_errors=True)


def test_every_chapter_in_the_toc_is_a_notebook_with_stored_outputs():
    for name in numbered_chapters():
        assert (BOOK / f"{name}.ipynb").is_file(), f"{name}.ipynb missing"
    chapters = chapter_sources()
    assert sorted(f for f in toc_files() if re.match(r"\d\d[a-z]?_", f)) == chapters, \
        "book/_toc.yml must list every chapter exactly once"


def test_every_page_exists(html):
    for name in toc_files():
        page = html / f"{name}.html"
        assert page.is_file(), f"{page.name} was not built"


def test_chapters_have_figures_that_exist(html):
    for name in numbered_chapters():
        text = (html / f"{name}.html").read_text(encoding="utf-8")
        images = re.findall(r'<img[^>]+src="([^"]+)"', text)
        figures = [src for src in images if "_images/" in src]
        assert figures, f"{name}: no figure in the rendered page"
        for src in figures:
            assert (html / src).is_file(), f"{name}: figure {src} missing from the build"


def test_chapters_have_math_and_the_local_mathjax(html):
    for name in numbered_chapters():
        text = (html / f"{name}.html").read_text(encoding="utf-8")
        assert re.search(r'class="math[^"]*"', text), f"{name}: no math in the rendered page"
        assert "_static/mathjax/tex-chtml.js" in text, f"{name}: MathJax is not the local copy"
        assert "cdn.jsdelivr.net/npm/mathjax" not in text
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def server(html):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(html))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def chromium(*args):
    browser = find_chromium()
    if browser is None:
        if os.environ.get("LOOPLM_REQUIRE_BROWSER"):
            pytest.fail("Chromium is required (LOOPLM_REQUIRE_BROWSER is set) but not installed")
        pytest.skip("no Chromium on this machine: install it to run the browser check")
    with tempfile.TemporaryDirectory() as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                   "--no-first-run", "--disable-background-networking", "--disable-component-update",
                   "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=15000",
                   "--window-size=1280,1600", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=180)


def test_browser_typesets_the_math(server):
    page = numbered_chapters()[-1]
    result = chromium("--dump-dom", f"{server}/{page}.html")
    dom = result.stdout
    assert "<body" in dom, f"Chromium returned no page: {result.stderr[-2000:]}"
    math_spans = re.findall(r'<(?:span|div) class="math[^"]*"[^>]*>(.*?)</(?:span|div)>', dom, re.S)
    assert math_spans, "no math elements in the page"
    typeset = dom.count("<mjx-container")
    assert typeset >= len(math_spans), f"only {typeset} of {len(math_spans)} formulas were typeset"
    raw = [m for m in math_spans if "\\(" in m or "\\[" in m or "$$" in m]
    assert not raw, f"raw TeX left in the page: {raw[:3]}"


def test_browser_screenshot(server):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / f"{numbered_chapters()[-1]}.png"
    shot.unlink(missing_ok=True)
    chromium(f"--screenshot={shot}", f"{server}/{numbered_chapters()[-1]}.html")
    assert shot.is_file() and shot.stat().st_size > 10_000, "no screenshot was written"


# Citations: the chapters cite with {cite}`key` (also {cite:p}, {cite:t}) from book/references.bib.
CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")
BARE_ARXIV = re.compile(r"arXiv[ :]?\d{4}\.\d{4,5}")


def bibliography_keys():
    text = (BOOK / "references.bib").read_text(encoding="utf-8")
    return re.findall(r"^@\w+\{([^,\s]+),", text, re.M)


def book_sources():
    """The chapter sources and the plain pages of the book."""
    return sorted(BOOK.glob("[0-9][0-9]*_*.py")) + sorted(BOOK.glob("*.md"))


def test_bibliography_keys_are_unique():
    keys = bibliography_keys()
    assert keys, "book/references.bib has no entries"
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    assert not duplicates, f"book/references.bib defines these keys twice: {duplicates}"


def test_every_cited_key_is_in_the_bibliography():
    keys = set(bibliography_keys())
    missing = []
    for path in book_sources():
        for group in CITE.findall(path.read_text(encoding="utf-8")):
            missing += [f"{path.name}: {key.strip()}" for key in group.split(",") if key.strip() not in keys]
    assert not missing, "cited but not in book/references.bib:\n" + "\n".join(missing)


def test_no_bare_arxiv_ids_in_the_prose():
    """The prose cites papers with {cite}; an arXiv id belongs in references.bib. (Code cells may
    name one in a docstring.)"""
    import jupytext

    found = []
    for path in book_sources():
        if path.suffix == ".py":
            texts = [c.source for c in jupytext.read(path).cells if c.cell_type == "markdown"]
        else:
            texts = [path.read_text(encoding="utf-8")]
        for text in texts:
            found += [f"{path.name}: {m}" for m in BARE_ARXIV.findall(text)]
    assert not found, "write these as {cite}`key` citations:\n" + "\n".join(found)


def chapter_pages():
    """The rendered page of every chapter and appendix built from a notebook."""
    return [f for f in toc_files() if re.match(r"\d\d[a-z]?_", f)]


def page_text(html, name):
    from bs4 import BeautifulSoup

    soup = BeautifulSoup((html / f"{name}.html").read_text(encoding="utf-8"), "html.parser")
    return soup.find("article") or soup.find("main")


def test_no_test_cell_source_in_the_rendered_pages(html):
    """Test cells stay in the notebooks (and in nbval and tests/), but the HTML book never shows
    them: they carry the remove-cell tag."""
    for name in chapter_pages():
        text = page_text(html, name).get_text(" ")
        for marker in ("#| test", "run_tests(test_", "run_tests( test_"):
            assert marker not in text, f"{name}.html shows test-cell source ({marker!r})"


PROSE_TAGS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "table", "dl", "blockquote"}
MAX_CODE_CELLS_IN_A_ROW = 3


def longest_code_run(article):
    """The longest run of rendered code cells with no prose between them, and where it ends."""
    run, worst, where = 0, 0, ""
    for element in article.find_all(True):
        if element.find_parent("div", class_="cell") is not None:
            continue                                   # inside a cell: its input or output
        classes = element.get("class") or []
        if element.name == "div" and "cell" in classes:
            run += 1
            if run > worst:
                worst, where = run, element.get_text(" ", strip=True)[:80]
        elif element.name in PROSE_TAGS or (element.name == "div" and "math" in classes):
            run = 0
    return worst, where


def test_code_cells_come_in_short_runs(html):
    """A reader meets prose at least every MAX_CODE_CELLS_IN_A_ROW code cells, counted in the HTML
    (cells removed from the page do not count)."""
    for name in chapter_pages():
        worst, where = longest_code_run(page_text(html, name))
        assert worst <= MAX_CODE_CELLS_IN_A_ROW, \
            f"{name}.html: {worst} code cells in a row without prose, the last starting {where!r}"


def test_the_run_counter_counts(tmp_path):
    """The counter itself, on a page made by hand: prose resets it, a cell's own output does not."""
    from bs4 import BeautifulSoup

    cell = '<div class="cell docutils container"><div class="cell_input">x = 1</div><p>out</p></div>'
    page = f"<article><p>text</p>{cell}{cell}<h2>next</h2>{cell}{cell}{cell}<p>more</p>{cell}</article>"
    assert longest_code_run(BeautifulSoup(page, "html.parser").article) == (3, "x = 1 out")


def test_idea_chapters_stay_short():
    # an idea chapter (book/NN_slug.py, not an appendix part NNa_ and not 90+) reads as an
    # argument: its source, hidden cells included, stays near 1,800 lines; engineering and
    # test batteries go to the appendix parts
    lengths = {p.name: len(p.read_text(encoding="utf-8").splitlines())
               for p in sorted(BOOK.glob("[0-8][0-9]_*.py"))}
    assert lengths, "no chapters found"
    too_long = {name: n for name, n in lengths.items() if n > 1950}
    assert not too_long, f"chapters over 1,950 lines (target about 1,800): {too_long}"
