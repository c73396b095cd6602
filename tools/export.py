"""Export the package and its tests from the chapters.

    python tools/export.py            write looplm/, kernels/ and tests/ from book/NN_*.py
    python tools/export.py --check    change nothing; fail if any generated file is stale

A code cell whose first lines are directives is exported (see CONTRIBUTING.md):

    #| default_exp block      the chapter's default module: looplm/block.py
    #| export                 this cell goes to the default module
    #| export data            this cell goes to looplm/data.py
    #| test                   this cell goes to tests/test_NN_slug.py (definitions only)

Output is deterministic: the same chapters always give byte-identical files.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jupytext

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"


def chapter_files(suffix: str, book: Path = BOOK) -> list[Path]:
    """book/NN_slug.<suffix> and book/NNa_slug.<suffix> (an appendix kept right after chapter NN,
    so that the modules it holds are built before later chapters extend them), in file-name order."""
    return sorted(p for p in book.glob(f"[0-9][0-9]*_*.{suffix}") if re.match(r"\d\d[a-z]?_", p.name))


GENERATED_MARK = "# Generated from "
# The only hand-written Python files allowed inside the package folders.
HAND_WRITTEN = {"looplm/__init__.py", "kernels/__init__.py"}


class ExportError(Exception):
    pass


@dataclass
class Piece:
    """One exported cell: where it came from and its code without directive lines."""

    chapter: str  # e.g. "book/01_weight_tied_block.py"
    cell: int  # index of the cell in the chapter, counted from 0
    code: str


@dataclass
class Target:
    pieces: list[Piece] = field(default_factory=list)


def chapters() -> list[Path]:
    return chapter_files("py")


def module_path(module: str) -> str:
    """'block' -> 'looplm/block.py'; 'kernels.rmsnorm' -> 'kernels/rmsnorm.py'."""
    module = module.strip()
    if module.startswith("looplm."):
        module = module[len("looplm.") :]
    parts = module.split(".")
    if not all(p.isidentifier() for p in parts):
        raise ExportError(f"not a module name: {module!r}")
    if parts[0] == "kernels":
        return "/".join(["kernels", *parts[1:]]) + ".py"
    return "/".join(["looplm", *parts]) + ".py"


def import_name(path: str) -> str:
    """'looplm/block.py' -> 'looplm.block'; 'kernels/x.py' -> 'looplm.kernels.x'."""
    dotted = path[: -len(".py")].replace("/", ".")
    return "looplm." + dotted if dotted.startswith("kernels.") else dotted


def split_directives(source: str) -> tuple[list[tuple[str, str]], str]:
    """Leading '#| name arg' lines -> [(name, arg)], and the rest of the cell."""
    lines = source.splitlines()
    directives = []
    while lines and lines[0].startswith("#|"):
        name, _, arg = lines.pop(0)[2:].strip().partition(" ")
        directives.append((name, arg.strip()))
    return directives, "\n".join(lines).strip("\n")


def public_names(code: str, where: str) -> list[str]:
    """Top-level functions, classes and assigned names not starting with '_'."""
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        raise ExportError(f"{where}: cannot parse exported code: {e}") from e
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return [n for n in names if not n.startswith("_")]


def test_definitions(code: str, where: str) -> str:
    """Drop a test cell's top-level expression statements (they run in the notebook only)."""
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        raise ExportError(f"{where}: cannot parse test cell: {e}") from e
    drop = set()
    for node in tree.body:
        if isinstance(node, ast.Expr):
            drop.update(range(node.lineno, node.end_lineno + 1))
    kept = [line for i, line in enumerate(code.splitlines(), 1) if i not in drop]
    return "\n".join(kept).strip("\n")


def collect() -> tuple[dict[str, Target], dict[str, Target], dict[str, list[str]]]:
    """Read every chapter: module targets, test targets, and the modules each chapter feeds."""
    modules: dict[str, Target] = {}
    tests: dict[str, Target] = {}
    chapter_modules: dict[str, list[str]] = {}
    for path in chapters():
        rel = path.relative_to(ROOT).as_posix()
        notebook = jupytext.read(path)
        default = None
        fed: list[str] = []
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type != "code":
                continue
            directives, code = split_directives(cell.source)
            where = f"{rel}, cell {index}"
            for name, arg in directives:
                if name == "default_exp":
                    if not arg:
                        raise ExportError(f"{where}: '#| default_exp' needs a module name")
                    default = module_path(arg)
                elif name == "export":
                    dest = module_path(arg) if arg else default
                    if dest is None:
                        raise ExportError(
                            f"{where}: '#| export' with no module and no '#| default_exp' before it"
                        )
                    public_names(code, where)  # fails early on code that does not parse
                    modules.setdefault(dest, Target()).pieces.append(Piece(rel, index, code))
                    if dest not in fed:
                        fed.append(dest)
                elif name == "test":
                    dest = "tests/test_" + path.stem + ".py"
                    body = test_definitions(code, where)
                    tests.setdefault(dest, Target()).pieces.append(Piece(rel, index, body))
                else:
                    raise ExportError(f"{where}: unknown directive '#| {name}'")
        chapter_modules[rel] = fed
    return modules, tests, chapter_modules


def header(sources: list[str]) -> str:
    listed = ", ".join(sources)
    return f"{GENERATED_MARK}{listed}: edit the chapter, then run `make export`.\n"


def runs_as_main(code: str) -> bool:
    """Does the code hold a top-level `if __name__ == "__main__"` guard?"""
    for node in ast.parse(code).body:
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) \
                and "__main__" in ast.unparse(node.test):
            return True
    return False


def render_module(target: Target) -> str:
    # A cell with the `if __name__ == "__main__"` guard goes last, so that `python -m` runs it
    # after every cell, including cells a later chapter adds to the same module.
    target = Target(sorted(target.pieces, key=lambda p: runs_as_main(p.code)))
    sources = sorted({p.chapter for p in target.pieces}, key=lambda s: s)
    names: list[str] = []
    for piece in target.pieces:
        for name in public_names(piece.code, piece.chapter):
            if name not in names:
                names.append(name)
    out = [header(sources)]
    out.append("# fmt: off\n__all__ = [" + ", ".join(repr(n) for n in names) + "]\n# fmt: on\n")
    for piece in target.pieces:
        out.append(f"\n# --- {piece.chapter}, cell {piece.cell} ---\n{piece.code}\n")
    return "".join(out)


def render_tests(target: Target, chapter_modules: dict[str, list[str]],
                 modules: dict[str, Target]) -> str:
    chapter = target.pieces[0].chapter
    out = [header([chapter])]
    for dest in chapter_modules.get(chapter, []):
        names = []
        for piece in modules[dest].pieces:
            if piece.chapter == chapter:
                names += [n for n in public_names(piece.code, chapter) if n not in names]
        if names:
            out.append(f"from {import_name(dest)} import (  # noqa: F401\n")
            out += [f"    {n},\n" for n in names]
            out.append(")\n")
    for piece in target.pieces:
        out.append(f"\n# --- {piece.chapter}, cell {piece.cell} ---\n{piece.code}\n")
    return "".join(out)


def package_inits(modules: dict[str, Target]) -> list[str]:
    """Sub-package folders (e.g. looplm/nn/) that need an __init__.py."""
    folders = set()
    for dest in modules:
        parts = dest.split("/")[:-1]
        for i in range(2, len(parts) + 1):
            folders.add("/".join(parts[:i]) + "/__init__.py")
    return sorted(folders)


def render_all() -> dict[str, str]:
    modules, tests, chapter_modules = collect()
    files = {dest: render_module(t) for dest, t in modules.items()}
    for dest, t in tests.items():
        files[dest] = render_tests(t, chapter_modules, modules)
    for init in package_inits(modules):
        files.setdefault(init, header(["(package folder)"]))
    return dict(sorted(files.items()))


def generated_on_disk() -> set[str]:
    found = set()
    for folder in ("looplm", "kernels", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            with path.open(encoding="utf-8") as f:
                first = f.readline()
            if first.startswith(GENERATED_MARK):
                found.add(path.relative_to(ROOT).as_posix())
    return found


def hand_written_modules() -> list[str]:
    """Package modules that no chapter generates: a defect unless listed in HAND_WRITTEN."""
    bad = []
    for folder in ("looplm", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            with path.open(encoding="utf-8") as f:
                first = f.readline()
            if rel not in HAND_WRITTEN and not first.startswith(GENERATED_MARK):
                bad.append(rel)
    return sorted(bad)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if any generated file is stale")
    args = parser.parse_args(argv)
    try:
        files = render_all()
    except ExportError as e:
        print(f"export: {e}", file=sys.stderr)
        return 1
    stale = sorted(generated_on_disk() - set(files))
    problems = []
    for rel, text in files.items():
        path = ROOT / rel
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            problems.append(f"{rel} differs from what the chapters produce"
                            if current is not None else f"{rel} is missing")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {rel}")
    for rel in stale:
        if args.check:
            problems.append(f"{rel} is generated but no chapter produces it any more")
        else:
            (ROOT / rel).unlink()
            print(f"removed {rel}")
    problems += [f"{rel} is a package module that no chapter builds" for rel in hand_written_modules()]
    if problems:
        print("export check failed (edit the chapters, then run `make export`):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    if args.check:
        print(f"export: {len(files)} generated files up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
