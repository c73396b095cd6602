# Generated from book/07a_appendix_decoding.py: edit the chapter, then run `make export`.

import contextlib
import io
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from looplm.checkpoints import (  # noqa: F401
    save_model,
    load_model,
    load_model_flag,
)
from looplm.checkpoints import CheckpointError
from looplm.exits import ExitRule, make_exit_rule
from looplm.generate import (  # noqa: F401
    main,
)
from looplm.generate import choose_tokens, generate
from looplm.model import LoopLM, LoopLMConfig, _physical_memory_bytes
from looplm.testing import LAYOUTS, recompute_greedy, small_model

# --- book/07a_appendix_decoding.py:166 (cell 7) ---
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

# --- book/07a_appendix_decoding.py:217 (cell 8) ---
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

# --- book/07a_appendix_decoding.py:431 (cell 14) ---
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

# --- book/07a_appendix_decoding.py:498 (cell 16) ---
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

# --- book/07a_appendix_decoding.py:658 (cell 18) ---
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
