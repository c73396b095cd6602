"""Check that every chapter's .py and .ipynb are the same chapter, and the notebook is executed.

    python tools/sync.py

Fails when a chapter has no paired notebook (or a notebook no chapter), when the two differ in any
cell's type, source or tags, or when a notebook has code cells that were never executed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jupytext

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export import chapter_files  # noqa: E402  (one rule for which files are chapters)


def cell_key(cell) -> tuple[str, str, tuple[str, ...]]:
    return cell.cell_type, cell.source, tuple(cell.metadata.get("tags", ()))


def check_pair(py: Path, ipynb: Path) -> list[str]:
    problems = []
    text_cells = jupytext.read(py).cells
    nb_cells = jupytext.read(ipynb).cells
    if len(text_cells) != len(nb_cells):
        problems.append(f"{py.name} has {len(text_cells)} cells, {ipynb.name} has {len(nb_cells)}")
    for i, (a, b) in enumerate(zip(text_cells, nb_cells)):
        if cell_key(a) != cell_key(b):
            what = "type" if a.cell_type != b.cell_type else (
                "source" if a.source != b.source else "tags")
            first = (a.source.splitlines() or [""])[0][:60]
            problems.append(f"{py.name} cell {i} ({first!r}) differs from the notebook in its {what}")
            break
    unexecuted = [i for i, c in enumerate(nb_cells)
                  if c.cell_type == "code" and c.source.strip() and c.get("execution_count") is None]
    if unexecuted:
        problems.append(f"{ipynb.name}: code cells {unexecuted[:5]} were never executed")
    return problems


def main() -> int:
    problems = []
    pys = {p.stem: p for p in chapter_files("py", BOOK)}
    nbs = {p.stem: p for p in chapter_files("ipynb", BOOK)}
    for stem in sorted(set(pys) | set(nbs)):
        if stem not in nbs:
            problems.append(f"book/{stem}.py has no executed notebook: run `make execute CHAPTER={stem[:2]}`")
        elif stem not in pys:
            problems.append(f"book/{stem}.ipynb has no chapter source book/{stem}.py")
        else:
            problems += check_pair(pys[stem], nbs[stem])
    if problems:
        print("sync check failed (edit the .py, then `make execute`):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"sync: {len(pys)} chapters paired with executed notebooks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
