"""Execute chapters and store their outputs in the paired notebooks.

    python tools/execute.py              every chapter
    python tools/execute.py 00 03        chapters whose file name starts with 00 or 03

The notebook is rebuilt from the .py source each time, executed top to bottom with a fresh kernel
in book/, and written without timestamps or Python's version, so executing twice leaves git clean.
An output holding a memory address is an error: it would change on every run.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import jupytext
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
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


def execute(py: Path) -> float:
    nb = jupytext.read(py)
    start = time.perf_counter()
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(BOOK)}})
    client.execute()
    seconds = time.perf_counter() - start
    bad = scrub(nb)
    if bad:
        raise SystemExit(f"{py.name}: cells {bad} print a memory address; assign the result "
                         "(`_ = torch.manual_seed(0)`) or print something stable")
    jupytext.write(nb, py.with_suffix(".ipynb"), fmt="ipynb")
    return seconds


def main(argv: list[str]) -> int:
    os.environ.setdefault("PYTHONHASHSEED", "0")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    chosen = sorted(BOOK.glob("[0-9][0-9]_*.py"))
    if argv:
        chosen = [p for p in chosen if any(p.name.startswith(a) for a in argv)]
        if not chosen:
            print(f"no chapter matches {argv}", file=sys.stderr)
            return 1
    for py in chosen:
        print(f"executing {py.relative_to(ROOT)} ...", flush=True)
        seconds = execute(py)
        print(f"  stored outputs in {py.with_suffix('.ipynb').relative_to(ROOT)} ({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
