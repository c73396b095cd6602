"""Execute chapters and store their outputs in the paired notebooks.

    python tools/execute.py              every chapter
    python tools/execute.py 00 03        chapters whose file name starts with 00 or 03

The notebook is rebuilt from the .py source each time, executed top to bottom with a fresh kernel
in book/, and written without timestamps or Python's version, so executing twice leaves git clean.
An output holding a memory address is an error: it would change on every run.

Cells tagged "timing" print wall-clock measurements, which differ on every run. Such a cell keeps
the output stored by an earlier execution when nothing it can depend on has changed since: the
code of the earlier chapters and of this chapter's cells up to and including it (their hash is
stored in the cell's metadata; prose is left out, so editing it keeps the timings). Pass --fresh-timings (or set LOOPLM_FRESH_TIMINGS=1) to store new timings.

Figures are PNG bytes, and the same plot can come out a few pixels different on another machine:
another CPU rounds a float differently (vectorised kernels, thread counts), which moves a line by
a fraction of a pixel and changes its anti-aliased edge by a level or two. Two rules keep a
re-execution on a new machine from rewriting figures that did not change:
- PNGs are written without matplotlib's "Software" metadata, which names matplotlib's version;
- a figure whose cell source is unchanged keeps its stored bytes when the decoded images have the
  same size and differ by at most FIGURE_MAX_LEVELS intensity levels (of 255) in at most
  FIGURE_MAX_FRACTION of their pixel values. Anything larger is a real change and is stored.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jupytext
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export import chapter_files  # noqa: E402  (one rule for which files are chapters)

ADDRESS = re.compile(r"\bat 0x[0-9a-fA-F]{6,}")


def coalesce_streams(outputs):
    """Merge consecutive stdout (or stderr) chunks: how a stream is split depends on timing."""
    merged = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if (output.get("output_type") == "stream" and previous is not None
                and previous.get("output_type") == "stream" and previous.get("name") == output.get("name")):
            previous["text"] = previous["text"] + output["text"]
        else:
            merged.append(output)
    return merged


def scrub(nb) -> list[str]:
    """Drop run-specific metadata in place; return the cells whose output shows an address."""
    nb.metadata.get("language_info", {}).pop("version", None)
    with_address = []
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"  # stable ids: jupytext would draw random ones on every run
        cell.metadata.pop("execution", None)
        if "outputs" in cell:
            cell.outputs = coalesce_streams(cell.outputs)
        for output in cell.get("outputs", []):
            text = output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
            if ADDRESS.search(text):
                with_address.append(i)
    return with_address


TIMING_TAG = "timing"
FIGURE_MAX_LEVELS = 8          # largest per-channel difference (of 255) still "the same figure"
FIGURE_MAX_FRACTION = 0.002    # at most this fraction of the pixel values may differ at all
KERNEL_SETUP = ("c = get_config()\n"
                "c.InlineBackend.print_figure_kwargs = {'bbox_inches': 'tight', 'metadata': {'Software': None}}\n")


def _decoded_png(data: str):
    """The pixels of a base64 PNG as a uint8 array [H, W, C] (None if it cannot be decoded)."""
    import numpy
    from matplotlib import image

    try:
        pixels = image.imread(io.BytesIO(base64.b64decode(data)), format="png")
    except Exception:  # noqa: BLE001 (a corrupt or foreign image is simply "different")
        return None
    return numpy.round(numpy.asarray(pixels, dtype=float) * 255).astype(numpy.int16)


def same_figure(new: str, old: str) -> bool:
    """Whether two base64 PNGs show the same figure, within the tolerance above."""
    if new == old:
        return True
    a, b = _decoded_png(new), _decoded_png(old)
    if a is None or b is None or a.shape != b.shape:
        return False
    difference = abs(a - b)
    return int(difference.max()) <= FIGURE_MAX_LEVELS and (difference > 0).mean() <= FIGURE_MAX_FRACTION


def keep_stored_figures(py: Path, nb) -> list[int]:
    """Give unchanged cells their stored PNG bytes back where the new ones are the same figure."""
    stored_path = py.with_suffix(".ipynb")
    stored = jupytext.read(stored_path).cells if stored_path.exists() else []
    kept = []
    for i, cell in enumerate(nb.cells):
        old = stored[i] if i < len(stored) else None
        if cell.cell_type != "code" or old is None or old.source != cell.source:
            continue
        old_outputs = old.get("outputs", [])
        if len(old_outputs) != len(cell.outputs):
            continue
        swapped = False
        for new_out, old_out in zip(cell.outputs, old_outputs):
            new_png = new_out.get("data", {}).get("image/png")
            old_png = old_out.get("data", {}).get("image/png")
            if new_png and old_png and new_png != old_png and same_figure(new_png, old_png):
                new_out["data"]["image/png"] = old_png
                swapped = True
        if swapped:
            kept.append(i)
    return kept


def inputs_hash(py: Path, nb, index: int) -> str:
    """What cell `index` of chapter `py` can depend on: the code of earlier chapters and of cells
    0..index (with their tags). Prose cannot change a timing, so editing it keeps them."""
    digest = hashlib.sha256()
    for earlier in chapter_files("py", BOOK):
        if earlier.name < py.name:
            digest.update(earlier.name.encode() + b"\0")
            for cell in jupytext.read(earlier).cells:
                if cell.cell_type == "code":
                    digest.update(cell.source.encode() + b"\0")
    for cell in nb.cells[: index + 1]:
        if cell.cell_type == "code":
            digest.update(cell.source.encode() + b"\0")
    return digest.hexdigest()


def keep_stored_timings(py: Path, nb) -> list[int]:
    """Give unchanged "timing" cells their stored outputs back; return their indices."""
    stored_path = py.with_suffix(".ipynb")
    stored = jupytext.read(stored_path).cells if stored_path.exists() else []
    stored_code = [cell for cell in stored if cell.cell_type == "code"]   # matched by their order:
    kept, n_code = [], 0                                                  # new prose shifts nothing
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        n_code += 1
        if TIMING_TAG not in cell.metadata.get("tags", []):
            continue
        key = inputs_hash(py, nb, i)
        cell.metadata["inputs_hash"] = key
        old = stored_code[n_code - 1] if n_code <= len(stored_code) else None
        if old is not None and old.metadata.get("inputs_hash") == key and old.source == cell.source:
            cell.outputs, cell.execution_count = old.outputs, old.get("execution_count")
            kept.append(i)
    return kept


def execute(py: Path, fresh_timings: bool = False) -> float:
    nb = jupytext.read(py)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as ipython_dir:
        profile = Path(ipython_dir) / "profile_default"
        profile.mkdir()
        (profile / "ipython_kernel_config.py").write_text(KERNEL_SETUP)
        client = NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(BOOK)}})
        saved = os.environ.get("IPYTHONDIR")
        os.environ["IPYTHONDIR"] = ipython_dir          # the kernel reads its config from there
        try:
            client.execute()
        finally:
            if saved is None:
                os.environ.pop("IPYTHONDIR", None)
            else:
                os.environ["IPYTHONDIR"] = saved
    seconds = time.perf_counter() - start
    figures = keep_stored_figures(py, nb)
    if figures:
        print(f"  kept the stored figures of cells {figures} (same figure within the tolerance)")
    if fresh_timings:
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code" and TIMING_TAG in cell.metadata.get("tags", []):
                cell.metadata["inputs_hash"] = inputs_hash(py, nb, i)
    else:
        kept = keep_stored_timings(py, nb)
        if kept:
            print(f"  kept the stored outputs of unchanged timing cells {kept}")
    bad = scrub(nb)
    if bad:
        raise SystemExit(f"{py.name}: cells {bad} print a memory address; assign the result "
                         "(`_ = torch.manual_seed(0)`) or print something stable")
    jupytext.write(nb, py.with_suffix(".ipynb"), fmt="ipynb")
    return seconds


def main(argv: list[str]) -> int:
    os.environ.setdefault("PYTHONHASHSEED", "0")
    os.environ.setdefault("TQDM_DISABLE", "1")
    # one thread per kernel, as under `make test`: the same floating-point sums, so the same
    # outputs, on machines with any number of cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    if shutil.which("nvidia-smi") is None:
        # no GPU: Triton kernels run in its interpreter, which must be chosen before Triton is
        # imported (importing looplm imports it); chapter 10 also sets this in its first cell
        os.environ.setdefault("TRITON_INTERPRET", "1")
    fresh_timings = "--fresh-timings" in argv or os.environ.get("LOOPLM_FRESH_TIMINGS") == "1"
    argv = [a for a in argv if a != "--fresh-timings"]
    chosen = chapter_files("py", BOOK)
    if argv:
        chosen = [p for p in chosen if any(p.name.startswith(a) for a in argv)]
        if not chosen:
            print(f"no chapter matches {argv}", file=sys.stderr)
            return 1
    for py in chosen:
        print(f"executing {py.relative_to(ROOT)} ...", flush=True)
        seconds = execute(py, fresh_timings)
        print(f"  stored outputs in {py.with_suffix('.ipynb').relative_to(ROOT)} ({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
