"""Export the package and its tests from the chapters.

    python tools/export.py            write looplm/, kernels/ and tests/ from book/NN_*.py
    python tools/export.py --check    change nothing; fail if any generated file is stale

A code cell whose first lines are directives is exported (see CONTRIBUTING.md):

    #| default_exp block      the chapter's default module: looplm/block.py
    #| export                 this cell goes to the default module
    #| export data            this cell goes to looplm/data.py
    #| test                   this cell goes to tests/test_NN_slug.py (definitions only)

A generated file holds a header, `__all__`, the imports of all its cells (gathered at the top,
once each), then each cell's remaining code under a banner naming the chapter line it starts at.
Output is deterministic: the same chapters always give byte-identical files.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import textwrap
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
    line: int  # line of the chapter (from 1) that holds the first line of `code`
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
    """'looplm/block.py' -> 'looplm.block'; 'looplm/generate/__init__.py' -> 'looplm.generate';
    'kernels/x.py' -> 'looplm.kernels.x'."""
    dotted = path[: -len(".py")].removesuffix("/__init__").replace("/", ".")
    return "looplm." + dotted if dotted.startswith("kernels.") else dotted


def split_directives(source: str) -> tuple[list[tuple[str, str]], str, int]:
    """Leading '#| name arg' lines -> [(name, arg)], the rest of the cell without its leading and
    trailing empty lines, and how many lines of `source` come before that rest."""
    lines = source.splitlines()
    directives = []
    while lines and lines[0].startswith("#|"):
        name, _, arg = lines.pop(0)[2:].strip().partition(" ")
        directives.append((name, arg.strip()))
    skipped = len(directives)
    while lines and lines[0] == "":
        lines.pop(0)
        skipped += 1
    return directives, "\n".join(lines).strip("\n"), skipped


# A percent-format cell starts at a line such as '# %%' or '# %% [markdown]' (jupytext's rule).
CELL_MARKER = re.compile(r"^\s*#\s*%%+(\s|$)")


def cell_starts(text: str, n_cells: int, where: str) -> list[int]:
    """The line (from 1) of each cell's '# %%' marker. jupytext does not report where its cells
    are, so we find the markers ourselves and insist there is exactly one per cell it read."""
    starts = [i for i, line in enumerate(text.splitlines(), 1) if CELL_MARKER.match(line)]
    if len(starts) != n_cells:
        raise ExportError(f"{where}: {len(starts)} '# %%' cell markers, but jupytext reads {n_cells} cells")
    return starts


def public_names(code: str, where: str) -> list[str]:
    """Top-level functions, classes and assigned names not starting with '_'."""
    return [n for n in top_level_names(code, where) if not n.startswith("_")]


def top_level_names(code: str, where: str) -> list[str]:
    """Top-level functions, classes and assigned names."""
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
    return names


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
        text = path.read_text(encoding="utf-8")
        notebook = jupytext.read(path)
        lines = text.splitlines()
        starts = cell_starts(text, len(notebook.cells), rel)
        default = None
        fed: list[str] = []
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type != "code":
                continue
            directives, code, skipped = split_directives(cell.source)
            where = f"{rel}, cell {index}"
            line = starts[index] + 1 + skipped  # the marker line, then the lines skipped
            if directives and code and lines[line - 1] != code.splitlines()[0]:
                raise ExportError(f"{where}: expected the cell's first line at {rel}:{line}, "
                                  f"found {lines[line - 1]!r}")
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
                    modules.setdefault(dest, Target()).pieces.append(Piece(rel, index, line, code))
                    if dest not in fed:
                        fed.append(dest)
                elif name == "test":
                    dest = "tests/test_" + path.stem + ".py"
                    body = test_definitions(code, where)
                    tests.setdefault(dest, Target()).pieces.append(Piece(rel, index, line, body))
                else:
                    raise ExportError(f"{where}: unknown directive '#| {name}'")
        chapter_modules[rel] = fed
    # A module with submodules is a package: looplm/generate.py becomes looplm/generate/__init__.py
    # when a chapter also exports looplm/generate/__main__.py (what `python -m looplm.generate` runs).
    folders = {dest.rsplit("/", 1)[0] for dest in modules if dest.count("/") >= 2}
    moved = {dest: dest[: -len(".py")] + "/__init__.py" for dest in modules if dest[: -len(".py")] in folders}
    modules = {moved.get(dest, dest): target for dest, target in modules.items()}
    chapter_modules = {rel: [moved.get(dest, dest) for dest in fed] for rel, fed in chapter_modules.items()}
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


def split_imports(code: str, where: str) -> tuple[list[tuple[ast.stmt, str]], str]:
    """A piece's top-level import statements, each with its source text (line breaks and comments
    such as '# noqa' kept), and the code that is left without them. Imports indented inside a
    function or an `if` are not top-level: they stay where they are."""
    tree = ast.parse(code)
    lines = code.splitlines()
    imports, drop = [], set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            text = "\n".join(lines[node.lineno - 1 : node.end_lineno])
            if len(ast.parse(text).body) != 1:
                raise ExportError(f"{where}: put the import {ast.unparse(node)!r} on lines of its own")
            imports.append((node, text))
            drop.update(range(node.lineno, node.end_lineno + 1))
    rest = "\n".join(line for i, line in enumerate(lines, 1) if i not in drop)
    return imports, rest.strip("\n")


def import_group(node: ast.stmt) -> int:
    """0 for __future__, 1 for the standard library, 2 for third-party packages, 3 for looplm."""
    if isinstance(node, ast.ImportFrom):
        top = "looplm" if node.level else node.module.split(".")[0]  # `from . import x` is ours
    else:
        top = node.names[0].name.split(".")[0]
    if top == "__future__":
        return 0
    if top in sys.stdlib_module_names:
        return 1
    return 3 if top == "looplm" else 2


def bound_names(node: ast.stmt) -> dict[str, str]:
    """The names an import statement binds, and what each is bound to."""
    bound = {}
    for alias in node.names:
        if isinstance(node, ast.ImportFrom):
            bound[alias.asname or alias.name] = "." * node.level + f"{node.module or ''}.{alias.name}"
        elif alias.asname:  # `import a.b as c` binds c to a.b
            bound[alias.asname] = alias.name
        else:  # `import a.b` binds a
            top = alias.name.split(".")[0]
            bound[top] = top
    return bound


def hoist_imports(pieces: list[Piece], where: str, first: list[str] = ()) -> tuple[str, list[Piece]]:
    """Take the top-level imports out of all the pieces: the import block for the top of the file
    (with the import statements in `first`), and the pieces without their imports, leaving out
    the pieces that held nothing else."""
    imports = [(ast.parse(text).body[0], text) for text in first]
    rest = []
    for piece in pieces:
        found, code = split_imports(piece.code, f"{piece.chapter}:{piece.line}")
        imports += found
        if code:
            rest.append(Piece(piece.chapter, piece.cell, piece.line, code))
    # At the top, an import binds its names before any cell runs: refuse the files in which that
    # could change what a name means (one name imported from two places, or also defined here).
    seen: dict[str, str] = {}
    for node, _ in imports:
        for name, value in bound_names(node).items():
            if seen.setdefault(name, value) != value:
                raise ExportError(f"{where}: {name!r} is imported both as {seen[name]} and as {value}")
    defined = {n for piece in rest for n in top_level_names(piece.code, where)}
    if defined & set(seen):
        raise ExportError(f"{where}: {', '.join(sorted(defined & set(seen)))} imported and also defined")
    return import_block(imports), rest


IMPORT_LINE_LENGTH = 110


def import_block(imports: list[tuple[ast.stmt, str]]) -> str:
    """The import statements of a file, each name imported once, in isort's sections (__future__,
    standard library, third party, looplm) and in module order within a section. The plain
    `from x import ...` statements of one module become one; a statement with a comment (such as
    '# noqa: F401') is kept as written."""
    statements: dict[str, tuple[ast.stmt, str]] = {}  # ast.dump ignores comments and line breaks
    aliases: dict[str, list[str]] = {}  # module -> ["a", "b as c"] for the statements to merge
    for node, text in imports:
        if isinstance(node, ast.ImportFrom) and "#" not in text:  # no strings in an import: '#' is a comment
            aliases.setdefault("." * node.level + (node.module or ""), []).extend(
                ast.unparse(alias) for alias in node.names)
        else:
            statements.setdefault(ast.dump(node), (node, text))
    named = {name for node, _ in statements.values() for name in bound_names(node)}
    for module, names in aliases.items():
        names = [a for a in dict.fromkeys(names) if a.split(" as ")[-1] not in named]
        if names:
            # isort's order: CONSTANTS, then Classes, then functions
            names.sort(key=lambda a: (not a.isupper(), not a[0].isupper(), a))
            text = f"from {module} import {', '.join(names)}"
            if len(text) > IMPORT_LINE_LENGTH:
                indent = " " * len(f"from {module} import (")
                text = textwrap.fill(f"from {module} import ({', '.join(names)})", IMPORT_LINE_LENGTH,
                                     subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)
            node = ast.parse(text).body[0]
            statements[ast.dump(node)] = (node, text)
    sections: list[list[tuple[bool, str, str]]] = [[], [], [], []]  # (is a `from`, module, text)
    for node, text in statements.values():
        if isinstance(node, ast.ImportFrom):
            sections[import_group(node)].append((True, "." * node.level + (node.module or ""), text))
        else:
            sections[import_group(node)].append((False, node.names[0].name, text))
    return "\n\n".join("\n".join(text for *_, text in sorted(s)) for s in sections if s)


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
    imports, pieces = hoist_imports(target.pieces, ", ".join(sources))
    return "".join(out) + render_body(imports, pieces)


def render_body(imports: str, pieces: list[Piece]) -> str:
    """The import block, then each piece under a banner naming the chapter line it starts at."""
    out = [f"\n{imports}\n"] if imports else []
    for piece in pieces:
        out.append(f"\n# --- {piece.chapter}:{piece.line} (cell {piece.cell}) ---\n{piece.code}\n")
    return "".join(out)


def render_tests(target: Target, chapter_modules: dict[str, list[str]],
                 modules: dict[str, Target]) -> str:
    chapter = target.pieces[0].chapter
    exported: dict[str, list[str]] = {}  # module -> the public names this chapter gives it
    for dest in chapter_modules.get(chapter, []):
        names = exported[dest] = []
        for piece in modules[dest].pieces:
            if piece.chapter == chapter:
                names += [n for n in public_names(piece.code, chapter) if n not in names]
    # A name the chapter gives two modules (say `main`) is ambiguous: a test cell that uses it
    # imports the one it means itself.
    everywhere = [n for names in exported.values() for n in names]
    own = []  # the imports of the chapter's own definitions
    for dest, names in exported.items():
        names = [n for n in names if everywhere.count(n) == 1]
        if names:
            lines = [f"from {import_name(dest)} import (  # noqa: F401"] + [f"    {n}," for n in names]
            own.append("\n".join(lines + [")"]))
    imports, pieces = hoist_imports(target.pieces, chapter, first=own)
    return header([chapter]) + render_body(imports, pieces)


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
