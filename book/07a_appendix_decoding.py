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
# # Appendix C, continued: models on disk and the decoding command line
#
# Chapter 7 decodes models held in memory. This part of Appendix C saves a trained model with
# the loop metadata a decoder needs, loads it back safely, and wraps chapter 7's `generate` in
# a command line, `python -m looplm.generate`. Its cells build `looplm/checkpoints.py`'s
# `save_model` and `load_model`, extend chapter 7's `looplm.generate` and write its `__main__.py`.

# %% tags=["hide-input"]
import argparse
import contextlib
import io
import math
import os
import pickle
import re
import sys
import tempfile
from pathlib import Path

import torch

import looplm
from looplm.exits import EXIT_RULES, make_exit_rule
from looplm.data import TASK_VOCAB
from looplm.generate import _check_cache_fits, cache_strategy, generate
from looplm.model import LoopLM, LoopLMConfig
from looplm.testing import run_tests
from looplm.checkpoints import CheckpointError, checkpoint_model, read_checkpoint, write_checkpoint

torch.set_num_threads(1)
_ = torch.manual_seed(0)
print("torch", torch.__version__, "| looplm", looplm.__version__)

# %% [markdown]
# The next cell names the module this part's `#| export` cells extend, and the hidden cell
# after it holds the small models the tests use.

# %%
#| default_exp generate

# %% tags=["remove-cell"]
#| test
import pytest
import torch

from looplm.exits import make_exit_rule
from looplm.generate import generate
from looplm.model import LoopLM, LoopLMConfig
from looplm.testing import LAYOUTS, small_model

# %% [markdown]
# ## C.12 Checkpoints with loop metadata
#
# A model on disk must come back with its loop: the number of steps, the injection, the gate.
# Chapter 4's checkpoint format already stores the `LoopLMConfig` and the looplm version, and
# writes atomically (a temporary file in the same folder, then `os.replace`). `save_model`
# writes a model alone in that format, in `looplm/checkpoints.py` beside it; `load_model`
# reads a file written by `save_model` or by
# `python -m looplm.train`. It refuses, with a `CheckpointError` (a `ValueError`): a file
# that is not a looplm checkpoint, one written by a newer or an unknown looplm version, a
# stored config this looplm cannot build, a `model=` whose config differs from the stored
# one (listing the differences), and weights that do not fit the stored config (naming the
# first tensors that differ, with their shapes). A file that holds Python objects other than
# tensors and plain data is refused too: unpickling such an object can run any code, which
# `torch.load(weights_only=True)` (chapter 4's reader) never does, and the error says so.

# %%
#| export checkpoints
def save_model(path, model, extra=None):
    """Write `model` (a LoopLM), its config and the looplm version to `path`, atomically. -> path."""
    if not isinstance(model, LoopLM):
        raise TypeError(f"model must be a LoopLM, got {type(model).__name__}")
    return write_checkpoint(path, model, extra=extra)


def _unreadable(path, error):
    """A clearer CheckpointError for a file torch.load(weights_only=True) refused, or None."""
    cause = error.__cause__
    if cause is None:                                  # read_checkpoint's own checks: already clear
        return None
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(cause))
    if isinstance(cause, pickle.UnpicklingError) and found:
        return CheckpointError(f"{path} is not a readable looplm checkpoint: it holds a reference to the Python "
                               f"object {found.group(1)}, which unpickling would call (that is how a pickle runs "
                               f"code), so it was not loaded; a looplm checkpoint holds tensors and plain data "
                               f"only, read with torch.load(weights_only=True)")
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(cause))
    reason = detail.group(1).strip() if detail else (str(cause).strip().splitlines() or ["it ends early"])[0][:160]
    return CheckpointError(f"{path} is not a readable looplm checkpoint: the file is damaged or was not written "
                           f"by torch.save ({type(cause).__name__}: {reason})")


def _listed(items, n=3):
    return "; ".join(items[:n]) + (f"; and {len(items) - n} more" if len(items) > n else "")


def _weight_mismatch(model, state):
    """What keeps `state` from loading into `model`, in words ('' if nothing)."""
    if not isinstance(state, dict):
        return f"its weights are a {type(state).__name__}, not a dict of tensors"
    expected = model.state_dict()
    shapes = [f"{k} is {list(v.shape)} in the file and {list(expected[k].shape)} in the model"
              for k, v in state.items() if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape]
    not_tensors = [f"{k} is a {type(v).__name__}" for k, v in state.items() if k in expected
                   and not isinstance(v, torch.Tensor)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} tensor(s) differ in shape: {_listed(shapes)}")
    if not_tensors:
        parts.append(f"{len(not_tensors)} entry(ies) are not tensors: {_listed(not_tensors)}")
    if missing:
        parts.append(f"{len(missing)} tensor(s) of the model are missing: {_listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) in the file belong to no part of the model: {_listed(unexpected)}")
    return ". ".join(parts)


def load_model(path, model=None, map_location="cpu"):
    """The LoopLM stored at `path` (by save_model or python -m looplm.train), built from its config,
    or loaded into `model` after checking that its config is the stored one. CheckpointError otherwise."""
    try:
        payload = read_checkpoint(path, map_location)
    except CheckpointError as e:
        clearer = _unreadable(path, e)
        if clearer is None:
            raise
        raise clearer from e
    model = checkpoint_model(path, payload, model)
    trainer = payload.get("trainer")
    if not isinstance(trainer, dict) or "model" not in trainer:
        raise CheckpointError(f"{path} holds no model weights (no trainer['model'] entry)")
    mismatch = _weight_mismatch(model, trainer["model"])
    if mismatch:
        raise CheckpointError(f"{path} holds weights that do not fit its model config: {mismatch}")
    model.load_state_dict(trainer["model"])
    return model


def load_model_flag(path, flag="--checkpoint"):
    """load_model(path) for a command line: a missing or unusable file is an error naming `flag`."""
    try:
        return load_model(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{flag}: {e}") from e
    except CheckpointError as e:
        raise CheckpointError(f"{flag}: {e}") from e

# %% tags=["remove-cell"]
#| test
import os
import tempfile
from pathlib import Path

from looplm.checkpoints import CheckpointError


def test_saved_model_loads_with_identical_logits():
    model = small_model(**LAYOUTS[2])
    idx = torch.tensor([[1, 5, 7, 3, 9, 2]])
    with tempfile.TemporaryDirectory() as folder:
        path = save_model(Path(folder) / "model.pt", model)
        assert os.listdir(folder) == ["model.pt"]                   # no temporary file left
        loaded = load_model(path)
        assert loaded.config == model.config
        with torch.no_grad():
            assert torch.equal(loaded(idx).logits, model(idx).logits)
            assert torch.equal(loaded(idx).gate, model(idx).gate)
        assert torch.equal(generate(loaded, idx, 5).tokens, generate(model, idx, 5).tokens)


def test_bad_checkpoints_are_refused():
    model = small_model()
    with tempfile.TemporaryDirectory() as folder:
        path = save_model(Path(folder) / "model.pt", model)
        other = small_model(n_loops=5)
        with pytest.raises(CheckpointError, match="n_loops: checkpoint 3, model 5"):
            load_model(path, model=other)
        payload = torch.load(path, weights_only=True)
        for version, message in (("99.0.0", "newer than the installed"), ("banana", "unknown looplm version")):
            torch.save({**payload, "looplm_version": version}, Path(folder) / "v.pt")
            with pytest.raises(CheckpointError, match=message):
                load_model(Path(folder) / "v.pt")
        (Path(folder) / "junk.pt").write_bytes(b"not a checkpoint")
        with pytest.raises(CheckpointError, match="not a readable looplm checkpoint"):
            load_model(Path(folder) / "junk.pt")
        with pytest.raises(FileNotFoundError):
            load_model(Path(folder) / "missing.pt")
        before = sorted(os.listdir(folder))
        bad = small_model()
        with torch.no_grad():
            bad.embed.weight[0, 0] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            save_model(Path(folder) / "nan.pt", bad)
        assert sorted(os.listdir(folder)) == before                 # nothing written


run_tests(test_saved_model_loads_with_identical_logits, test_bad_checkpoints_are_refused)

# %% tags=["remove-cell", "nbval-check-output"]
#| test
import io


class _Hostile:
    """Unpickling this object would call io.open(marker, "w"): a stand-in for a pickle that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return io.open, (self.marker, "w")


def test_unusable_checkpoints_say_why():
    model = small_model()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        payload = torch.load(save_model(folder / "model.pt", model), weights_only=True)
        wide = LoopLM(LoopLMConfig(vocab_size=23, d_model=64, n_heads=4, n_loops=3, max_seq_len=40))
        torch.save({**payload, "trainer": {"model": wide.state_dict()}}, folder / "wide.pt")
        with pytest.raises(CheckpointError) as info:
            load_model(folder / "wide.pt")
        message, n_tensors = str(info.value), len(model.state_dict())
        assert f"{n_tensors} tensor(s) differ in shape: embed.weight is [23, 64] in the file and [23, 32] in the model; " in message
        assert message.endswith(f"; and {n_tensors - 3} more"), message             # whole, not cut off
        fewer = {k: v for k, v in model.state_dict().items() if k != "norm.weight"}
        torch.save({**payload, "trainer": {"model": fewer}}, folder / "fewer.pt")
        with pytest.raises(CheckpointError, match="1 tensor\\(s\\) of the model are missing: norm.weight$"):
            load_model(folder / "fewer.pt")
        marker = folder / "marker"
        torch.save({**payload, "extra": _Hostile(marker)}, folder / "hostile.pt")
        with pytest.raises(CheckpointError, match=r"reference to the Python object io.open, which unpickling would "
                                                  r"call .* so it was not loaded"):
            load_model(folder / "hostile.pt")
        assert not marker.exists()                                   # nothing ran
        (folder / "junk.pt").write_bytes(b"garbage" * 10)
        with pytest.raises(CheckpointError, match="not a readable looplm checkpoint: the file is damaged"):
            load_model(folder / "junk.pt")


run_tests(test_unusable_checkpoints_say_why)

# %% [markdown]
# ## C.13 A command line
#
# `python -m looplm.generate --checkpoint PATH --prompt TEXT [--prompt TEXT ...]` loads a
# model and completes the prompts, written in chapter 0's task vocabulary, until the end token
# `.` or `--max-new-tokens`. `--cache` picks the strategy, `--exit-rule` and
# `--exit-threshold` the rule (each rule's threshold defaults to its class's `default_threshold`), and
# `--temperature`, `--top-k`, `--seed` sampling. It prints each completion with the steps
# every new token used.
#
# A bad flag gets one line on stderr, `error: ...`, naming the flag and what is wrong with its
# value, and exit status 2, never a traceback. The flags are checked before the checkpoint is
# read (a threshold that is not a finite number, a temperature that is not, a sampling flag
# given for greedy decoding), and again against the model once it is loaded (a prompt that
# does not fit its context with `--max-new-tokens`, an exit rule that needs a gate the model
# lacks).

# %%
#| export
from looplm.checkpoints import load_model, load_model_flag, save_model   # the command line's, and for importers

class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, `error: ...`, with exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _parser():
    p = _Parser(prog="python -m looplm.generate",
                description="Complete prompts with a saved looped LM (KV cache, per-token exit).")
    p.add_argument("--checkpoint", required=True, help="a file written by save_model or python -m looplm.train")
    p.add_argument("--prompt", action="append", required=True, help="a prompt in the task vocabulary (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="at most this many new tokens (default: as many as the model's context allows)")
    p.add_argument("--cache", default="exact", help="exact, last, first, average or mod-K (default exact)")
    p.add_argument("--exit-rule", default="none", choices=["none", *EXIT_RULES], help="per-token exit (default none)")
    p.add_argument("--exit-threshold", type=float, default=None, help="the rule's threshold (default: the rule's own)")
    p.add_argument("--min-steps", type=int, default=1)
    p.add_argument("--n-loops", type=int, default=None, help="loop steps (default: the model's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (needs --temperature)")
    p.add_argument("--seed", type=int, default=0, help="the sampling generator's seed, in [0, 2**64)")
    return p


def _rule_from_args(args):
    if args.min_steps < 1:
        raise ValueError(f"--min-steps must be an int >= 1, got {args.min_steps}")
    if args.exit_rule == "none":
        if args.exit_threshold is not None:
            raise ValueError(f"--exit-threshold {args.exit_threshold} has no rule to set: add --exit-rule "
                             f"({', '.join(EXIT_RULES)})")
        return None
    threshold = EXIT_RULES[args.exit_rule].default_threshold if args.exit_threshold is None else args.exit_threshold
    if not math.isfinite(threshold):
        raise ValueError(f"--exit-threshold must be a finite number, got {threshold}")
    if args.exit_rule == "fixed":
        if not float(threshold).is_integer():
            raise ValueError(f"--exit-threshold is the number of steps for --exit-rule fixed, a whole number "
                             f">= 1, got {threshold}")
        threshold = int(threshold)
    try:
        return make_exit_rule(args.exit_rule, threshold, min_steps=args.min_steps)
    except ValueError as e:
        raise ValueError(f"--exit-threshold {threshold} does not suit --exit-rule {args.exit_rule}: {e}") from e


def _check_flags(args, vocab):
    """The flags' values checked on their own, before any file is read. -> (exit rule, prompt ids)."""
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be an int >= 0, got {args.max_new_tokens}")
    try:
        cache_strategy(args.cache)
    except ValueError as e:
        raise ValueError(f"--cache: {e}") from e
    rule = _rule_from_args(args)
    if args.n_loops is not None and args.n_loops < 1:
        raise ValueError(f"--n-loops must be an int >= 1, got {args.n_loops}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None:
        if args.top_k < 1:
            raise ValueError(f"--top-k must be an int >= 1, got {args.top_k}")
        if args.temperature == 0:
            raise ValueError(f"--top-k {args.top_k} has no effect on greedy decoding: add --temperature T > 0")
    if not 0 <= args.seed < 2**64:
        raise ValueError(f"--seed must be an int in [0, 2**64), got {args.seed}")
    prompts = []
    for text in args.prompt:
        if not text:
            raise ValueError("--prompt '' is empty: generation needs at least one token to start from")
        try:
            prompts.append(vocab.encode(text))
        except ValueError as e:
            raise ValueError(f"--prompt {text!r}: {e}") from e
    return rule, prompts


def _check_against_model(args, model, rule, prompts):
    """The flags checked against the loaded model. -> max_new_tokens."""
    c = model.config
    for text, ids in zip(args.prompt, prompts):
        if max(ids) >= c.vocab_size:
            raise ValueError(f"--prompt {text!r} holds token id {max(ids)}, outside the vocabulary of the model in "
                             f"--checkpoint (vocab_size={c.vocab_size}): it was not trained on the task vocabulary")
    longest = max(len(ids) for ids in prompts)
    if longest > c.max_seq_len:
        raise ValueError(f"--prompt: the longest prompt has {longest} tokens, more than the context of the model in "
                         f"--checkpoint holds (max_seq_len={c.max_seq_len})")
    room = c.max_seq_len - longest + 1                     # the last new token is never fed back
    if args.max_new_tokens is not None and args.max_new_tokens > room:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} is too many: the longest prompt has {longest} "
                         f"tokens, and {longest} + {args.max_new_tokens} - 1 = {longest + args.max_new_tokens - 1} "
                         f"positions (every new token but the last is fed back) do not fit the model's context "
                         f"(max_seq_len={c.max_seq_len}); use --max-new-tokens {room} or less")
    if rule is not None and "gates" in rule.needs and model.exit_gate is None:
        raise ValueError(f"--exit-rule {args.exit_rule} reads the exit gate, and the model in --checkpoint has "
                         f"none: choose another --exit-rule")
    max_new = room if args.max_new_tokens is None else args.max_new_tokens
    n_loops = c.n_loops if args.n_loops is None else args.n_loops
    try:
        _check_cache_fits(model, cache_strategy(args.cache), len(prompts), longest, max(max_new - 1, 0), n_loops,
                          next(model.parameters()).device)
    except ValueError as e:
        raise ValueError(f"--n-loops {n_loops} with --max-new-tokens {max_new}: {e}") from e
    return max_new


def main(argv=None):
    """python -m looplm.generate --help. Returns an exit status."""
    args = _parser().parse_args(argv)
    vocab = TASK_VOCAB
    try:
        rule, prompts = _check_flags(args, vocab)
        model = load_model_flag(args.checkpoint)
        max_new = _check_against_model(args, model, rule, prompts)
        generator = torch.Generator().manual_seed(args.seed)
        res = generate(model, prompts, max_new, temperature=args.temperature, top_k=args.top_k,
                       stop_tokens=[vocab.eos_id], cache=args.cache, exit_rule=rule, n_loops=args.n_loops,
                       pad_id=vocab.pad_id, generator=generator)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for text, new, steps in zip(args.prompt, res.new_tokens.tolist(), res.steps.tolist()):
        kept = [(t, s) for t, s in zip(new, steps) if s > 0]
        completion = vocab.decode([t for t, _ in kept])
        print(f"{text} -> {completion}   steps per token {[s for _, s in kept]}")
    return 0

# %% [markdown]
# `python -m looplm.generate` runs the package's `looplm/generate/__main__.py`, which is this
# cell (`looplm-generate`, the console command `pip install` puts on the path, calls `main`
# directly). The decoder itself lives in `looplm/generate/__init__.py`, which `import looplm`
# loads for `looplm.generate`, so a command line kept in it would run a module already imported.

# %%
#| export generate.__main__
from looplm.generate import main

if __name__ == "__main__" and "get_ipython" not in globals():
    raise SystemExit(main())

# %% [markdown]
# ## C.14 Bad input gets a clear error
#
# Every argument of `generate` and every flag of the command line is checked before any work is
# done, so a bad call leaves nothing behind: no cache is built and the command writes no file.
# The tests below hold the full battery.

# %% tags=["remove-cell"]
#| test
import contextlib
import io
import subprocess
import sys


def test_bad_input_gets_clear_errors():
    model = small_model()
    good = [[1, 2, 3]]
    cases = [
        (dict(idx=[[]]), ValueError, "prompt 0 is empty"),
        (dict(idx=[]), ValueError, "there are no prompts"),
        (dict(idx=[[1, 99]]), ValueError, r"ids outside \[0, vocab_size=23\)"),
        (dict(idx=[[-1, 2]]), ValueError, r"ids outside \[0, vocab_size=23\)"),
        (dict(idx=[list(range(1, 20)) * 2]), ValueError, "leaves room for at most"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be an int >= 0"),
        (dict(cache="lastest"), ValueError, "unknown cache strategy 'lastest'"),
        (dict(cache="mod-0"), ValueError, "unknown cache strategy 'mod-0'"),
        (dict(exit_rule="q_exit"), ValueError, "built without one"),
        (dict(exit_rule="sometimes"), ValueError, "unknown exit rule 'sometimes'"),
        (dict(exit_rule=make_exit_rule("q_exit", 0.5)), ValueError, "built without"),
        (dict(temperature=-1.0), ValueError, "temperature must be"),
        (dict(top_k=0), ValueError, "top_k must be an int >= 1"),
        (dict(stop_tokens=[23]), ValueError, "stop_tokens must be token ids"),
        (dict(idx=torch.tensor([[1.0, 2.0]])), TypeError, "integer tensor"),
    ]
    for change, error, message in cases:
        kwargs = {"idx": good, "max_new_tokens": 4, **change}
        with pytest.raises(error, match=message):
            generate(model, kwargs.pop("idx"), kwargs.pop("max_new_tokens"), **kwargs)
    assert generate(model, good, 0).tokens.tolist() == good        # zero new tokens is allowed


def test_command_line():
    with tempfile.TemporaryDirectory() as folder:
        path = save_model(Path(folder) / "m.pt", LoopLM(LoopLMConfig(vocab_size=24, d_model=32, n_heads=4,
                                                                    exit_gate=True, max_seq_len=40)))
        base = [sys.executable, "-m", "looplm.generate", "--checkpoint", str(path), "--max-new-tokens", "3"]
        ok = subprocess.run(base + ["--prompt", "K12-3=", "--prompt", "A1+2=", "--exit-rule", "q_exit"],
                            capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.startswith("K12-3= -> ") and "steps per token" in ok.stdout
        from looplm.generate import main               # the rest in this process: the same main()

        for bad, message in ((["--prompt", "K1=", "--cache", "middle"], "unknown cache strategy"),
                             (["--prompt", "hello"], "is not in the vocabulary"),
                             (["--prompt", "K1=", "--max-new-tokens", "-2"], "--max-new-tokens")):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    status = main(base[3:-2] + bad)
                except SystemExit as stop:                 # argparse's own errors
                    status = stop.code
            assert status == 2 and message in err.getvalue(), err.getvalue()
        assert os.listdir(folder) == ["m.pt"]


run_tests(test_bad_input_gets_clear_errors, test_command_line)

# %% [markdown]
# The hidden tests below hold the rest: a bool where an int is expected, stop tokens that are
# not a collection, a model with a NaN in its weights, a cache too large for the machine; every
# bad flag of `python -m looplm.generate` (one `error:` line naming it, exit status 2), and
# every bad flag of `python -m looplm.bench decode`, refused before anything is trained.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
import contextlib
import io
import math

from looplm.model import _physical_memory_bytes


def test_silent_results_become_errors():
    model = small_model()
    good = [[1, 2, 3]]
    for change, error, message in [
        (dict(pad_id=True), ValueError, "pad_id must be an int token id"),
        (dict(top_k=True, temperature=1.0), ValueError, "top_k must be an int"),
        (dict(n_loops=True), ValueError, "n_loops must be an int"),
        (dict(stop_tokens=[True]), ValueError, "stop_tokens must be token ids"),
        (dict(stop_tokens=5), TypeError, r"stop_tokens must be None or a list, tuple or set of token ids \(e.g. \[5\]"),
        (dict(stop_tokens="5"), TypeError, "stop_tokens must be None or a list"),
        (dict(generator=0), TypeError, "generator must be a torch.Generator"),
        (dict(record=1), ValueError, "record must be True or False"),
    ]:
        with pytest.raises(error, match=message):
            generate(model, good, 4, **change)
    with pytest.raises(ValueError, match="max_new_tokens must be an int"):
        generate(model, good, True)
    assert generate(model, good, 4, stop_tokens=(5,)).tokens.shape == generate(model, good, 4, stop_tokens={5}).tokens.shape
    with torch.no_grad():
        model.core[0].mlp.up.weight[3, 1] = float("inf")
    with pytest.raises(ValueError, match="parameter core.0.mlp.up.weight holds non-finite values"):
        generate(model, good, 4)
    if _physical_memory_bytes() is not None:
        with pytest.raises(ValueError, match="the KV cache for n_loops=1000000000000, 1 prompt"):
            generate(small_model(), good, 4, n_loops=10**12)


def _cli(argv):
    """main(argv) in this process -> (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:                                      # argparse's own errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_command_line_flags():
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model = LoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, max_seq_len=22))
        path = str(save_model(Path(folder) / "m.pt", model))
        base = ["--checkpoint", path, "--prompt", "K12-3="]
        code, out, err = _cli(base + ["--n-loops", "1", "--max-new-tokens", "3"])
        assert code == 0 and out.startswith("K12-3= -> ") and "steps per token [1, 1, 1]" in out, err
        greedy = _cli(base + ["--max-new-tokens", "4"])
        assert greedy[0] == 0 and _cli(base + ["--max-new-tokens", "4", "--temperature", "1e-300"]) == greedy
        cases = [
            (["--exit-rule", "fixed", "--exit-threshold", "nan"], "--exit-threshold must be a finite number, got nan"),
            (["--exit-rule", "fixed", "--exit-threshold", "inf"], "--exit-threshold must be a finite number, got inf"),
            (["--exit-rule", "fixed", "--exit-threshold", "1.5"], "--exit-threshold is the number of steps"),
            (["--exit-rule", "confidence", "--exit-threshold", "nan"], "--exit-threshold must be a finite number"),
            (["--exit-rule", "confidence", "--exit-threshold", "2"], "--exit-threshold 2.0 does not suit"),
            (["--exit-threshold", "0.5"], "--exit-threshold 0.5 has no rule to set"),
            (["--exit-rule", "kl", "--min-steps", "0"], "--min-steps must be an int >= 1"),
            (["--exit-rule", "q_exit"], "--exit-rule q_exit reads the exit gate"),
            (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
            (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
            (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
            (["--top-k", "0", "--temperature", "1"], "--top-k must be an int >= 1"),
            (["--top-k", "3"], "--top-k 3 has no effect on greedy decoding"),
            (["--max-new-tokens", "100"], "--max-new-tokens 100 is too many: the longest prompt has 6 tokens, and "
                                          "6 + 100 - 1 = 105 positions (every new token but the last is fed back) "
                                          "do not fit the model's context (max_seq_len=22); use --max-new-tokens 17 "
                                          "or less"),
            (["--prompt", "K" * 30], "--prompt: the longest prompt has 30 tokens"),
            (["--prompt", ""], "--prompt '' is empty"),
            (["--prompt", "hello"], "--prompt 'hello': character 'h'"),
            (["--n-loops", "0"], "--n-loops must be an int >= 1"),
            (["--n-loops", "two"], "argument --n-loops: invalid int value: 'two'"),
            (["--cache", "mod-0"], "--cache: unknown cache strategy 'mod-0'"),
            (["--seed", "-1"], "--seed must be an int in [0, 2**64)"),
        ]
        if _physical_memory_bytes() is not None:
            cases.append((["--n-loops", str(10**12)], "--n-loops 1000000000000 with --max-new-tokens 17: the KV cache"))
        for flags, message in cases:
            code, out, err = _cli(base + flags)
            assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, (flags, err)
            assert message in err, (flags, err)
        for checkpoint, message in ((Path(folder) / "missing.pt", "--checkpoint: no checkpoint at"),
                                    (Path(folder), "--checkpoint: no checkpoint at")):
            code, _, err = _cli(["--checkpoint", str(checkpoint), "--prompt", "K1="])
            assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_bench_decode_checks_its_flags():
    import argparse

    from looplm.bench import BENCHMARKS

    _, add_arguments, run = BENCHMARKS["decode"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "junk.pt").write_bytes(b"garbage" * 10)
        marker = folder / "marker"
        torch.save({"format": "looplm-checkpoint", "extra": _Hostile(marker)}, folder / "hostile.pt")
        small = save_model(folder / "small.pt", LoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, max_seq_len=8)))
        cases = [(["--task", "chess"], ValueError, "--task must be one of addition, parentheses, sorting, stack"),
                 (["--checkpoint", str(folder / "missing.pt")], FileNotFoundError, "--checkpoint: no checkpoint at"),
                 (["--checkpoint", str(folder / "junk.pt")], CheckpointError, "--checkpoint: .* the file is damaged"),
                 (["--checkpoint", str(folder / "hostile.pt")], CheckpointError, "--checkpoint: .* so it was not loaded"),
                 (["--checkpoint", str(small)], ValueError, "--difficulty 4: decoding the stack examples .* "
                                                            "max_seq_len=8; use a smaller --difficulty")]
        for flag in ("--n-test", "--repeats", "--batch-size", "--train-steps", "--difficulty", "--speed-examples"):
            cases.append(([flag, "0"], ValueError, f"{flag} must be an int >= 1, got 0"))
        for flags, error, message in cases:
            with pytest.raises(error, match=message):
                run(parser.parse_args(flags))
        assert not marker.exists()


class EndsAtOnce(LoopLM):
    """A LoopLM that always predicts the end token, so no answer has a second token."""

    def readout(self, h, cos, sin, attend=None, last_only=False):
        logits, z = super().readout(h, cos, sin, attend, last_only)
        return logits + 100.0 * torch.nn.functional.one_hot(torch.tensor(1), logits.shape[-1]), z


def test_bench_decode_without_decoded_tokens():
    from looplm.bench import bench_decode, format_decode_table
    from looplm.data import TASK_VOCAB, make_splits

    assert TASK_VOCAB.eos_id == 1
    model = EndsAtOnce(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, exit_gate=True, max_seq_len=16))
    examples = make_splits("stack", n_train=50, n_test=4, max_difficulty=2, ood_max_difficulty=3).test
    result = bench_decode(model, examples, settings=(("exact", None), ("exact", "q_exit")), batch_size=2,
                          speed_examples=1, repeats=1)
    assert all(math.isnan(r["tok_s_1"]) and math.isnan(r["speedup_2"]) for r in result["rows"])
    assert "nan: no token was decoded after the first one" in format_decode_table(result)


run_tests(test_silent_results_become_errors, test_command_line_flags, test_bench_decode_checks_its_flags,
          test_bench_decode_without_decoded_tokens)

# %% [markdown]
# ## C.15 Regression tests of decoding
#
# Chapter 7 checks that cached decoding equals recomputing everything; these tests pin the
# cases around it. A subclass of `LoopLM` whose `encode`, `step` and `readout` each do something extra decodes
# exactly as its own `forward` recomputes, because `generate` calls those methods rather than
# a copy of them. An explicit `n_loops=k` equals recomputing with `model(idx, n_loops=k)`. A
# model converted with `.double()` decodes in float64, within $10^{-12}$ of its forward, and
# its exit rules see float64 logits and gates. With
# `init_state="random"`, equally seeded generators give equal tokens, greedy or sampled, and
# the global generator is not touched. A temperature of $10^{-300}$ decodes greedily. And a
# stop token ends its row: the columns after it hold `pad_id` with step count 0.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
import torch

from looplm.exits import ExitRule, make_exit_rule
from looplm.generate import choose_tokens, generate
from looplm.model import LoopLM
from looplm.testing import LAYOUTS, recompute_greedy, small_model


class ShiftedLoopLM(LoopLM):
    """A LoopLM whose encode, step and readout each do something its parent does not."""

    def encode(self, idx, cos, sin, attend=None):
        return 1.5 * super().encode(idx, cos, sin, attend)

    def step(self, h, x0, cos, sin, attend=None):
        return 0.8 * super().step(h, x0, cos, sin, attend) + 0.05

    def readout(self, h, cos, sin, attend=None, last_only=False):
        logits, z = super().readout(h, cos, sin, attend, last_only)
        return 3.0 * logits, z


def test_decoding_runs_the_models_own_step():
    for options in LAYOUTS:
        torch.manual_seed(0)
        model = ShiftedLoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_loops=3, max_seq_len=40,
                                           **options))
        tokens, logits = recompute_greedy(model, [1, 5, 7, 3, 9], 8)
        res = generate(model, [[1, 5, 7, 3, 9]], 8)
        assert torch.equal(res.new_tokens[0], tokens), options
        torch.testing.assert_close(res.logits[0], logits, atol=1e-5, rtol=0)


def test_explicit_n_loops_equals_recompute():
    model = small_model(**LAYOUTS[1])
    for k in (1, 2, 5):
        tokens, logits = recompute_greedy(model, [1, 5, 7, 3, 9], 6, n_loops=k)
        res = generate(model, [[1, 5, 7, 3, 9]], 6, n_loops=k)
        assert torch.equal(res.new_tokens[0], tokens) and (res.steps == k).all(), k
        torch.testing.assert_close(res.logits[0], logits, atol=1e-5, rtol=0)


class DtypeProbe(ExitRule):
    """A rule that never fires and records the dtypes of the logits and gates it is shown."""

    name, needs, stop_above = "probe", ("logits", "gates"), True

    def __init__(self):
        super().__init__(2.0)
        self.seen = set()

    def score(self, view):
        self.seen |= {view.logits.dtype, view.gates.dtype}
        return torch.zeros(view.token_shape)


def test_a_float64_model_decodes_in_float64():
    for options in LAYOUTS:
        model = small_model(**options).double()
        tokens, logits = recompute_greedy(model, [1, 5, 7, 3, 9], 8)
        res = generate(model, [[1, 5, 7, 3, 9]], 8)
        assert res.logits.dtype == logits.dtype == torch.float64
        assert torch.equal(res.new_tokens[0], tokens), options
        torch.testing.assert_close(res.logits[0], logits, atol=1e-12, rtol=0)
    probe = DtypeProbe()                                     # what an exit rule sees: float64 too
    generate(small_model(**LAYOUTS[2]).double(), [[1, 5, 7, 3, 9]], 4, exit_rule=probe)
    assert probe.seen == {torch.float64}, probe.seen


def test_the_generator_drives_every_random_draw():
    model = small_model(injection="add", init_state="random")
    prompts = [[1, 5, 7, 3, 9], [2, 2]]
    for temperature in (0.0, 1.0):
        before = torch.get_rng_state()
        runs = [generate(model, prompts, 6, temperature=temperature, generator=torch.Generator().manual_seed(seed))
                for seed in (7, 7, 8)]
        assert torch.equal(torch.get_rng_state(), before), "the global generator was used"
        assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].logits, runs[1].logits)
        assert not torch.equal(runs[0].logits, runs[2].logits)             # the draws do matter


def test_a_tiny_temperature_is_greedy():
    model = small_model(**LAYOUTS[1])
    prompts = [[1, 5, 7, 3, 9], [2, 2]]
    greedy = generate(model, prompts, 6)
    for temperature in (1e-300, 5e-324):
        res = generate(model, prompts, 6, temperature=temperature, top_k=3, generator=torch.Generator().manual_seed(0))
        assert torch.equal(res.tokens, greedy.tokens), temperature
    logits = torch.tensor([[1e30, -1e30, 0.0], [0.0, 0.5, 0.25]])
    assert choose_tokens(logits, 1e-300).tolist() == [0, 1]


def test_a_stop_token_ends_its_row():
    model = small_model(**LAYOUTS[1])
    prompts, pad = [[1, 5, 7, 3, 9], [2, 2]], 22
    free = generate(model, prompts, 8, pad_id=pad)
    row0, row1 = free.new_tokens.tolist()
    col = next(c for c in range(1, 8) if row0[c] not in row0[:c])      # the first new token not seen before
    stop = row0[col]
    res = generate(model, prompts, 8, stop_tokens=[stop], pad_id=pad)
    assert res.new_tokens[0, :col + 1].tolist() == row0[:col + 1]
    assert (res.new_tokens[0, col + 1:] == pad).all() and (res.steps[0, col + 1:] == 0).all()
    assert (res.steps[0, :col + 1] == 3).all() and (res.logits[0, col + 1:] == 0).all()
    assert res.sequences()[0] == prompts[0] + row0[:col + 1] and res.sequences()[0][-1] == stop
    end = row1.index(stop) + 1 if stop in row1 else 8                   # the other row goes on to its own stop
    assert res.new_tokens[1, :end].tolist() == row1[:end] and (res.steps[1, end:] == 0).all()
    assert res.sequences()[1] == prompts[1] + row1[:end]


run_tests(test_decoding_runs_the_models_own_step, test_explicit_n_loops_equals_recompute,
          test_a_float64_model_decodes_in_float64, test_the_generator_drives_every_random_draw,
          test_a_tiny_temperature_is_greedy, test_a_stop_token_ends_its_row)

# %% [markdown]
# ## Summary
#
# `looplm/checkpoints.py` gains `save_model(path, model, extra=None)` and
# `load_model(path, model=None, map_location="cpu")` (a `CheckpointError` for foreign, newer,
# broken or code-running files, naming mismatched tensors), and `looplm.generate` the command
# line `python -m looplm.generate`, or `looplm-generate` (`main(argv)`), whose bad flags each
# end in one `error:` line and exit status 2.
