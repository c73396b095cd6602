"""Suite tests of the package as a whole: its index and its command lines."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    tomllib = pytest.importorskip("tomllib")          # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_index_exports_the_public_api():
    import looplm
    from looplm.generate import main  # noqa: F401  (importing the submodule must not shadow the function)

    for name in ("GPT", "GPTConfig", "LoopLM", "LoopLMConfig", "LoopOutput", "exit_distribution",
                 "q_exit_steps", "stage1_loss", "stage2_gate_loss", "generate", "GenerationResult",
                 "save_model", "load_model"):
        assert callable(getattr(looplm, name)), name
        assert name in looplm.__all__ and name in dir(looplm)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        looplm.nonexistent  # noqa: B018


@pytest.mark.parametrize("module", ["looplm.train", "looplm.bench", "looplm.generate", "looplm.grade",
                                    "looplm.results"])
def test_command_lines_start_cleanly(module):
    # `python -m looplm.X --help` exits 0 and writes nothing to stderr (no runpy warning either)
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and result.stderr == ""


def test_console_entry_points_run_the_command_lines():
    # pyproject's [project.scripts]: each is installed beside the interpreter, and its main prints
    # its help and exits 0, the way the installed script calls it
    declared = _pyproject()["project"]["scripts"]
    assert set(declared) == {"looplm-train", "looplm-generate", "looplm-bench", "looplm-grade"}
    for name, target in declared.items():
        assert (Path(sys.executable).parent / name).exists(), f"{name} is not installed: pip install -e ."
        module, function = target.split(":")
        with pytest.raises(SystemExit) as done:
            getattr(importlib.import_module(module), function)(["--help"])
        assert done.value.code == 0, name
    result = subprocess.run([str(Path(sys.executable).parent / "looplm-generate"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage:") and result.stderr == ""


def _package_modules():
    return sorted(p for p in (ROOT / "looplm").rglob("*.py") if "assets" not in p.parts)


def test_no_module_imports_looplm_inside_a_function():
    # imports of looplm modules sit at module level, so the dependency order is visible at the top
    found = []
    for path in _package_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("looplm"):
                        found.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
                    if isinstance(inner, ast.Import) and any(a.name.startswith("looplm") for a in inner.names):
                        found.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    assert not found, found


def test_the_package_filters_no_warnings_and_lists_every_subpackage():
    index = (ROOT / "looplm" / "__init__.py").read_text()
    assert "filterwarnings" not in index
    declared = set(_pyproject()["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "looplm").rglob("__init__.py")}
    assert folders <= declared, folders - declared


def test_the_exit_distribution_lives_below_both_of_its_users():
    # model computes p(t|x) for its gate without importing adaptive; adaptive checks and reuses it
    model = importlib.import_module("looplm.model")
    adaptive = importlib.import_module("looplm.adaptive")
    import torch
    gate = torch.rand(5, 3, 4)
    assert torch.equal(model._exit_distribution(gate), adaptive.exit_distribution(gate))
    assert "import looplm.adaptive" not in (ROOT / "looplm" / "model.py").read_text()
    assert "from looplm.adaptive" not in (ROOT / "looplm" / "model.py").read_text()
