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
        files += [c["file"] for c in part["chapters"]]
    return files


def numbered_chapters():
    return [f for f in toc_files() if re.match(r"\d\d_", f) and not f.startswith("9")]


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
    chapters = sorted(p.stem for p in BOOK.glob("[0-9][0-9]_*.py"))
    assert sorted(f for f in toc_files() if re.match(r"\d\d_", f)) == chapters, \
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
