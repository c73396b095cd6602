"""Suite tests of the package as a whole: its index and its command lines."""

import subprocess
import sys

import pytest


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


@pytest.mark.parametrize("module", ["looplm.train", "looplm.bench", "looplm.generate", "looplm.grade"])
def test_command_lines_start_cleanly(module):
    # `python -m looplm.X --help` exits 0 and writes nothing to stderr (no runpy warning either)
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and result.stderr == ""
