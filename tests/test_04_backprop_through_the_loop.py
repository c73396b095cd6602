# Generated from book/04_backprop_through_the_loop.py: edit the chapter, then run `make export`.
from looplm.backprop import (  # noqa: F401
    STEP_WEIGHTS,
    step_weights,
    weighted_step_loss,
    saved_tensor_bytes,
    loop_forward,
    scale_core_grads,
    sample_depth,
    hidden_norm_penalty,
    step_consistency,
    LoopLoss,
    make_loop_loss,
)
from looplm.experiments import (  # noqa: F401
    CH04_SPLITS,
    FIXED_VS_RANDOM_DEPTH,
)
from looplm.train import (  # noqa: F401
    CHECKPOINT_FORMAT,
    CheckpointError,
    save_checkpoint,
    read_checkpoint,
    checkpoint_model,
    load_checkpoint,
    RESUME_MAY_CHANGE,
    Recipe,
    RECIPES,
    write_metrics,
    main,
)
from looplm.bench import (  # noqa: F401
    MinimalLoopedLM,
    minimal_from_looplm,
    bench_train,
    format_train_table,
    plot_train,
    BENCHMARKS,
    main,
)

# --- book/04_backprop_through_the_loop.py, cell 20 ---
import math

import pytest
import torch

from looplm.data import IGNORE_INDEX


def test_weighted_step_loss_matches_the_formula():
    torch.manual_seed(0)
    S, B, T = 3, 2, 5
    targets = torch.randint(0, 7, (B, T))
    targets[0, :2] = IGNORE_INDEX
    step_losses = torch.rand(S, B, T) * (targets != IGNORE_INDEX)
    cells = [(b, i) for b in range(B) for i in range(T) if targets[b, i] != IGNORE_INDEX]
    means = [sum(step_losses[t, b, i].item() for b, i in cells) / len(cells) for t in range(S)]
    for weights, raw in [("last", [0, 0, 1]), ("uniform", [1, 1, 1]), ("linear", [1, 2, 3]),
                         ([2.0, 0.0, 6.0], [2, 0, 6])]:
        expected = sum(r * m for r, m in zip(raw, means)) / sum(raw)
        got = weighted_step_loss(step_losses, targets, weights).item()
        assert math.isclose(got, expected, rel_tol=1e-6), (weights, got, expected)
    assert step_weights("linear", 4).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])

# --- book/04_backprop_through_the_loop.py, cell 25 ---
import torch.nn.functional as F
from torch import nn

from looplm.block import RMSNorm
from looplm.model import LoopLM, LoopLMConfig, token_losses


class ExactRMSNorm(nn.Module):
    """RMSNorm computed in the input's dtype (the package's RMSNorm works in float32)."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def tiny_float64_model(seed=0, **overrides):
    """A tiny float64 LoopLM (d 8, 2 heads, 3 loops) whose norms keep float64."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=11, d_model=8, n_heads=2, n_loops=3, max_seq_len=4, init_std=0.3)
    model = LoopLM(LoopLMConfig(**{**fields, **overrides})).double()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, RMSNorm):
                setattr(module, name, ExactRMSNorm(child))
    return model


def float64_loss(logits, targets):
    """Mean cross-entropy of the last step's logits [S, B, T, V], computed in logits' dtype."""
    return F.cross_entropy(logits[-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


tiny = tiny_float64_model()

# --- book/04_backprop_through_the_loop.py, cell 27 ---
def core_loss_function(model, idx, targets):
    """(core weights...) -> loss: the model's last-step loss as a function of its core's weights."""
    names = [name for name, _ in model.named_parameters() if name.startswith("core.")]

    def loss(*core_weights):
        out = torch.func.functional_call(model, dict(zip(names, core_weights)), (idx,))
        return float64_loss(out.logits, targets)

    weights = tuple(p.detach().clone().requires_grad_() for name, p in model.named_parameters()
                    if name.startswith("core."))
    return loss, weights


def test_gradcheck_core_weights():
    model = tiny_float64_model()
    idx = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(2))
    loss, weights = core_loss_function(model, idx, targets)
    # every core weight, along random directions (fast mode)
    assert torch.autograd.gradcheck(loss, weights, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
    # one weight matrix, coordinate by coordinate: the attention's output projection W_o
    names = [name for name, _ in model.named_parameters() if name.startswith("core.")]
    k = names.index("core.0.attn.proj.weight")
    only_w_o = lambda w_o: loss(*weights[:k], w_o, *weights[k + 1:])   # noqa: E731
    assert torch.autograd.gradcheck(only_w_o, (weights[k],), eps=1e-6, atol=1e-6, rtol=1e-4)

# --- book/04_backprop_through_the_loop.py, cell 35 ---
def untied_step_grads(model, idx, targets, n_loops):
    """Per-step gradients of the core's weights, each step with its own copy (by hand)."""
    cos, sin = model.rope(idx.shape[1])
    params = dict(model.core.named_parameters())
    copies = [{n: p.detach().clone().requires_grad_() for n, p in params.items()} for _ in range(n_loops)]
    h = model.init_state(model.encode(idx, cos, sin))
    for t in range(n_loops):
        for i, block in enumerate(model.core):
            mine = {n.split(".", 1)[1]: p for n, p in copies[t].items() if n.startswith(f"{i}.")}
            h = torch.func.functional_call(block, mine, (h, cos, sin))
    loss = float64_loss(model.readout(h, cos, sin)[0][None], targets)
    flat = [p for copy in copies for p in copy.values()]
    grads = torch.autograd.grad(loss, flat)
    return [grads[t * len(params):(t + 1) * len(params)] for t in range(n_loops)], list(params)


def test_tied_gradient_is_sum_of_per_step_gradients():
    model = tiny_float64_model(seed=3, n_core=2, n_loops=4)
    idx = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(4))
    targets = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(5))
    per_step, names = untied_step_grads(model, idx, targets, 4)
    float64_loss(model(idx).logits, targets).backward()
    for k, name in enumerate(names):
        tied = dict(model.core.named_parameters())[name].grad
        torch.testing.assert_close(sum(step[k] for step in per_step), tied, rtol=1e-10, atol=1e-12)
        assert all(step[k].abs().sum() > 0 for step in per_step)   # every step contributes

# --- book/04_backprop_through_the_loop.py, cell 57 ---
def _full_model(seed=0):
    torch.manual_seed(seed)
    return LoopLM(LoopLMConfig(vocab_size=13, d_model=16, n_heads=2, n_prelude=1, n_core=2,
                               n_coda=1, n_loops=3, tie_embeddings=False, max_seq_len=8))


def _batch(seed=0, B=3, T=6, V=13):
    g = torch.Generator().manual_seed(seed)
    idx, targets = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    targets[:, :2] = IGNORE_INDEX
    return idx, targets


def test_loop_forward_equals_model_forward():
    model = _full_model()
    idx, targets = _batch()
    for n_loops in (1, 3, 5):
        ref = model(idx, targets=targets, n_loops=n_loops, return_hidden=True)
        for knobs in ({}, {"checkpoint": True}, {"grad_steps": 1}, {"grad_steps": n_loops, "checkpoint": True}):
            out = loop_forward(model, idx, targets=targets, n_loops=n_loops, return_hidden=True, **knobs)
            for field in ("logits", "step_losses", "loss", "hidden"):
                assert torch.equal(getattr(out, field), getattr(ref, field)), (n_loops, knobs, field)
        last = loop_forward(model, idx, targets=targets, n_loops=n_loops, readout="last")
        assert torch.equal(last.logits[0], ref.logits[-1]) and torch.equal(last.loss, ref.loss)


def test_checkpointing_gives_the_same_gradients():
    model = _full_model(1)
    idx, targets = _batch(1)

    def grads(run):
        model.zero_grad(set_to_none=True)
        out = run()
        (out.step_losses.sum() / (targets != IGNORE_INDEX).sum()).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads(lambda: model(idx, targets=targets, n_loops=4))
    for ck in (False, True):
        mine = grads(lambda: loop_forward(model, idx, targets, n_loops=4, checkpoint=ck))
        for a, b in zip(plain, mine):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

# --- book/04_backprop_through_the_loop.py, cell 62 ---
def test_truncated_backprop_drops_the_early_steps():
    model = _full_model(2)
    idx, targets = _batch(2)
    S, k = 5, 2

    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss_fn().backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

    def by_hand():
        cos, sin = model.rope(idx.shape[1])
        x0 = model.encode(idx, cos, sin)
        h = model.init_state(x0)
        losses = []
        for t in range(S):
            h = model.step(h.detach() if t == S - k else h, x0, cos, sin)
            if t >= S - k:                               # only the last k readouts carry gradient
                losses.append(token_losses(model.readout(h, cos, sin)[0][None], targets)[0].sum())
        return sum(losses)

    def truncated():
        return loop_forward(model, idx, targets, n_loops=S, grad_steps=k).step_losses.sum()

    for a, b in zip(grads(truncated), grads(by_hand)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    full = grads(lambda: loop_forward(model, idx, targets, n_loops=S).step_losses.sum())
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(grads(truncated), full))

# --- book/04_backprop_through_the_loop.py, cell 67 ---
def test_checkpointing_saves_less_for_backward():
    model = _full_model(5)
    idx, targets = _batch(5)
    params = list(model.parameters())

    def saved(checkpoint):
        return saved_tensor_bytes(lambda: loop_forward(model, idx, targets, n_loops=6, checkpoint=checkpoint).loss,
                                  params)[0]

    plain, checkpointed = saved(False), saved(True)
    assert 0 < checkpointed < plain / 2, (plain, checkpointed)

# --- book/04_backprop_through_the_loop.py, cell 91 ---
def test_sample_depth_is_reproducible_and_has_the_stated_mean():
    first = [sample_depth(4, 0.5, torch.Generator().manual_seed(7)) for _ in range(3)]
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    assert [sample_depth(6.5, 0.5, g1) for _ in range(50)] == [sample_depth(6.5, 0.5, g2) for _ in range(50)]
    assert len(set(first)) == 1
    g = torch.Generator().manual_seed(0)
    for mean_steps in (2, 8):
        draws = torch.tensor([sample_depth(mean_steps, 0.5, g) for _ in range(8000)], dtype=torch.float64)
        assert draws.min() >= 1
        # Var r = r̄ + r̄^2 (e^{σ^2} - 1); five standard errors of the mean of 8000 draws
        tolerance = 5 * math.sqrt((mean_steps + mean_steps**2 * (math.exp(0.25) - 1)) / 8000)
        assert abs(draws.mean().item() - (mean_steps + 1)) < tolerance
    assert {sample_depth(3, 0.0, g) for _ in range(200)} >= {1, 3, 5}   # sigma 0: Poisson(3) + 1

# --- book/04_backprop_through_the_loop.py, cell 105 ---
def test_regularizers_match_loops_over_steps():
    torch.manual_seed(0)
    hidden = torch.randn(4, 2, 3, 8) * torch.tensor([1.0, 2.0, 2.0, 0.5]).view(4, 1, 1, 1)
    rms = [hidden[t].pow(2).mean(-1).sqrt() for t in range(4)]
    expected = sum((rms[t].log() - rms[t - 1].log()).pow(2).mean() for t in range(1, 4)) / 3
    torch.testing.assert_close(hidden_norm_penalty(hidden), expected)
    assert hidden_norm_penalty(hidden[:1]).item() == 0.0

    logits = torch.randn(3, 2, 4, 5, requires_grad=True)
    targets = torch.tensor([[1, 2, IGNORE_INDEX, 0], [IGNORE_INDEX, 4, 4, 1]])
    terms = []
    for t in range(2):
        for b, i in [(b, i) for b in range(2) for i in range(4) if targets[b, i] != IGNORE_INDEX]:
            p, q = logits[2, b, i].detach().softmax(-1), logits[t, b, i].softmax(-1)
            terms.append((p * (p.log() - q.log())).sum())
    torch.testing.assert_close(step_consistency(logits, targets), sum(terms) / len(terms))
    step_consistency(logits, targets).backward()
    assert logits.grad[2].abs().max() == 0            # the last step is the teacher: no gradient
    assert step_consistency(logits[:1], targets).item() == 0.0


def test_loop_loss_matches_its_parts():
    model = _full_model(3)
    idx, targets = _batch(3)
    loss_fn = make_loop_loss(step_weights="uniform", norm_penalty=0.5, consistency=0.25)
    loss, metrics = loss_fn(model, idx, targets)
    out = model(idx, targets=targets, return_hidden=True)
    expected = (weighted_step_loss(out.step_losses, targets, "uniform") + 0.5 * hidden_norm_penalty(out.hidden)
                + 0.25 * step_consistency(out.logits, targets))
    torch.testing.assert_close(loss, expected)
    assert metrics["depth"] == 3 and math.isclose(metrics["ce"], weighted_step_loss(
        out.step_losses, targets, "uniform").item(), rel_tol=1e-6)
    # the lean path (last readout only) gives the model's own loss
    torch.testing.assert_close(make_loop_loss()(model, idx, targets)[0], out.loss)
    # sampled depths follow sample_depth with the loss function's seed, and resume from state_dict
    sampled = make_loop_loss(sample_depth=3, seed=5)
    g = torch.Generator().manual_seed(5)
    assert [sampled.depth(model) for _ in range(20)] == [sample_depth(3, 0.5, g) for _ in range(20)]
    state = sampled.state_dict()
    ahead = [sampled.depth(model) for _ in range(5)]
    sampled.load_state_dict(state)
    assert [sampled.depth(model) for _ in range(5)] == ahead


def test_scale_core_grad_divides_the_core_gradient_once():
    model = _full_model(4)
    idx, targets = _batch(4)

    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss_fn(model, idx, targets)[0].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads(make_loop_loss(grad_steps=2))
    scaled = grads(make_loop_loss(grad_steps=2, scale_core_grad=True))
    for name in plain:
        factor = 0.5 if name.startswith("core.") else 1.0       # 2 steps with gradient
        torch.testing.assert_close(scaled[name], plain[name] * factor)
    assert grads(make_loop_loss(grad_steps=2)).keys() == plain.keys()
    for name, g in grads(make_loop_loss(grad_steps=2)).items():  # the hooks are gone
        torch.testing.assert_close(g, plain[name])

# --- book/04_backprop_through_the_loop.py, cell 114 ---
from looplm.results import check_prefix


def test_stored_depth_experiment_matches_a_live_prefix():
    difference, _ = check_prefix("fixed-vs-random-depth")
    assert difference <= 1e-3

# --- book/04_backprop_through_the_loop.py, cell 136 ---
import os
import tempfile
from pathlib import Path

import looplm
from looplm.train import TrainConfig, Trainer


def _tiny_get_batch(generator):
    idx = torch.randint(0, 13, (4, 8), generator=generator)
    return idx, idx.roll(-1, dims=1)


def _tiny_trainer(steps=6, loss_fn=None):
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=13, d_model=16, n_heads=2, n_loops=2, max_seq_len=8))
    kwargs = {} if loss_fn is None else {"loss_fn": loss_fn}
    config = TrainConfig(steps=steps, batch_size=4, warmup_steps=2, progress=False)
    return Trainer(model, _tiny_get_batch, config, **kwargs)


def test_checkpoint_round_trip_continues_exactly():
    whole = _tiny_trainer(loss_fn=make_loop_loss(sample_depth=2, seed=3))
    whole.run()
    with tempfile.TemporaryDirectory() as folder:
        half = _tiny_trainer(loss_fn=make_loop_loss(sample_depth=2, seed=3))
        half.run(until=3)
        path = save_checkpoint(Path(folder) / "run" / "checkpoint.pt", half, extra={"note": "half"})
        assert sorted(os.listdir(path.parent)) == ["checkpoint.pt"]           # no temporary file left
        payload = read_checkpoint(path)
        assert payload["looplm_version"] == looplm.__version__ and payload["extra"] == {"note": "half"}
        resumed = load_checkpoint(path, _tiny_get_batch, loss_fn=make_loop_loss(sample_depth=2, seed=3))
        assert resumed.step == 3 and resumed.model.config == half.model.config
        resumed.run()
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        assert torch.equal(a, b)


def test_failed_write_leaves_the_old_checkpoint_intact():
    trainer = _tiny_trainer()
    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(Path(folder) / "checkpoint.pt", trainer)
        before = path.read_bytes()
        trainer.run(until=2)
        with pytest.raises(Exception):
            save_checkpoint(path, trainer, extra={"unpicklable": lambda: None})   # fails while writing
        assert path.read_bytes() == before
        assert os.listdir(folder) == ["checkpoint.pt"]
        with torch.no_grad():
            next(trainer.model.parameters())[0, 0] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            save_checkpoint(path, trainer)
        assert path.read_bytes() == before


def test_unusable_checkpoints_get_clear_errors():
    trainer = _tiny_trainer()
    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(Path(folder) / "checkpoint.pt", trainer)
        other = LoopLM(LoopLMConfig(vocab_size=13, d_model=32, n_heads=2, n_loops=2, max_seq_len=8))
        with pytest.raises(CheckpointError, match="d_model: checkpoint 16, model 32"):
            load_checkpoint(path, _tiny_get_batch, model=other)
        newer = Path(folder) / "newer.pt"
        payload = torch.load(path, weights_only=True)
        payload["looplm_version"] = "99.0.0"
        torch.save(payload, newer)
        with pytest.raises(CheckpointError, match="written by looplm 99.0.0, newer than the installed"):
            load_checkpoint(newer, _tiny_get_batch)
        garbage = Path(folder) / "garbage.pt"
        garbage.write_bytes(b"not a checkpoint at all")
        with pytest.raises(CheckpointError, match="is not a readable looplm checkpoint"):
            read_checkpoint(garbage)
        truncated = Path(folder) / "truncated.pt"
        truncated.write_bytes(path.read_bytes()[:200])
        with pytest.raises(CheckpointError, match="is not a readable looplm checkpoint"):
            read_checkpoint(truncated)
        foreign = Path(folder) / "foreign.pt"
        torch.save({"model": {}}, foreign)
        with pytest.raises(CheckpointError, match="is not a looplm checkpoint"):
            read_checkpoint(foreign)
        with pytest.raises(FileNotFoundError):
            read_checkpoint(Path(folder) / "missing.pt")

# --- book/04_backprop_through_the_loop.py, cell 138 ---
def test_checkpoints_with_non_finite_weights_are_refused():
    trainer = _tiny_trainer()
    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(Path(folder) / "checkpoint.pt", trainer)
        payload = torch.load(path, weights_only=True)
        broken = Path(folder) / "broken.pt"
        for bad in (float("nan"), float("inf"), -float("inf")):
            weights = {name: tensor.clone() for name, tensor in payload["trainer"]["model"].items()}
            weights["core.0.mlp.up.weight"][1, 2] = bad
            torch.save({**payload, "trainer": {**payload["trainer"], "model": weights}}, broken)
            message = r"the stored model tensor core\.0\.mlp\.up\.weight holds 1 non-finite value \(NaN or inf\)"
            with pytest.raises(CheckpointError, match=message):
                read_checkpoint(broken)                         # what every loader calls first
            with pytest.raises(CheckpointError, match=message):
                load_checkpoint(broken, _tiny_get_batch)
        torch.save({**payload, "trainer": {"step": 3}}, broken)
        with pytest.raises(CheckpointError, match="holds no model weights"):
            read_checkpoint(broken)


def test_a_save_removes_the_temporary_files_of_killed_saves():
    trainer = _tiny_trainer()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        stale = [".checkpoint.pt.k3j_2h1g.tmp", ".checkpoint.pt.0badc0ffee00.tmp"]     # mkstemp's names, ours
        others = [".checkpoint.pt.bak.k3j2h1g0.tmp", ".metrics.jsonl.k3j2h1g0.tmp", "notes.tmp", "checkpoint.pt.tmp"]
        for name in stale + others:
            (folder / name).write_bytes(bytes(4096))
        save_checkpoint(folder / "checkpoint.pt", trainer)
        assert sorted(os.listdir(folder)) == sorted(["checkpoint.pt", *others])

# --- book/04_backprop_through_the_loop.py, cell 160 ---
import contextlib
import io
import subprocess
import sys

from looplm.train import main


def _quiet_main(argv):
    """main(argv) with its output captured (it names temporary folders)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(argv)


def test_command_line_trains_saves_and_resumes():
    with tempfile.TemporaryDirectory() as folder:
        args = ["--task", "stack", "--difficulty", "3", "--n-loops", "2", "--d-model", "16", "--n-heads", "2",
                "--batch-size", "8", "--n-train", "200", "--n-test", "50", "--eval-every", "2", "--out", folder]
        result = subprocess.run([sys.executable, "-m", "looplm.train", *args, "--steps", "4"],
                                capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"},
                                timeout=120)
        assert result.returncode == 0, result.stderr
        assert "step      4/4" in result.stdout and "test accuracy" in result.stdout
        assert sorted(os.listdir(folder)) == ["checkpoint.pt", "loss.png", "metrics.jsonl"]
        assert read_checkpoint(Path(folder) / "checkpoint.pt")["trainer"]["step"] == 4
        assert _quiet_main([*args, "--steps", "4"]) == 2                    # refuses to overwrite
        assert _quiet_main([*args, "--steps", "6", "--resume"]) == 0
        assert read_checkpoint(Path(folder) / "checkpoint.pt")["trainer"]["step"] == 6
        assert _quiet_main([*args, "--steps", "8", "--resume", "--d-model", "32"]) == 2   # another model

# --- book/04_backprop_through_the_loop.py, cell 162 ---
import errno
import importlib
import json

_TINY_RUN = ["--task", "stack", "--difficulty", "2", "--n-loops", "2", "--d-model", "8", "--n-heads", "2",
             "--batch-size", "4", "--n-train", "40", "--n-test", "10", "--eval-every", "2", "--no-progress"]


def _main_output(argv):
    """(exit status, stderr) of main(argv), its output captured."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, err.getvalue()


def _one_line(err, start):
    """The one line `err` holds, which must start with `start`: no traceback, nothing else."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(start) and "Traceback" not in err, err
    return lines[0]


def _read_jsonl(path):
    def invalid(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")
    return [json.loads(line, parse_constant=invalid) for line in Path(path).read_text().splitlines()]


def test_resume_refuses_flags_that_change_the_run():
    with tempfile.TemporaryDirectory() as folder:
        run = [*_TINY_RUN, "--steps", "2", "--out", folder]
        assert _main_output(run)[0] == 0
        path = Path(folder) / "checkpoint.pt"
        flags = read_checkpoint(path)["extra"]["flags"]                 # plain data, read with weights_only
        assert flags["task"] == "stack" and flags["seed"] == 0 and flags["grad_steps"] is None
        assert all(value is None or type(value) in (str, int, float, bool) for value in flags.values())
        before = path.read_bytes()
        for change, message in [
                (["--task", "addition"], "--task is 'stack' in the run being resumed, 'addition' here"),
                (["--difficulty", "3"], "--difficulty is 2 in the run being resumed, 3 here"),
                (["--reverse-answer"], "--reverse-answer is not set in the run being resumed, set here"),
                (["--n-train", "41"], "--n-train is 40 in the run being resumed, 41 here"),
                (["--n-test", "11"], "--n-test is 10 in the run being resumed, 11 here"),
                (["--seed", "1"], "--seed is 0 in the run being resumed, 1 here"),
                (["--lr", "0.01"], "--lr is 0.003 in the run being resumed, 0.01 here"),
                (["--batch-size", "8"], "--batch-size is 4 in the run being resumed, 8 here"),
                (["--step-weights", "uniform"], "--step-weights is 'last' in the run being resumed, 'uniform' here"),
                (["--grad-steps", "1"], "--grad-steps is not set in the run being resumed, 1 here"),
                (["--checkpointing"], "--checkpointing is not set in the run being resumed, set here"),
                (["--n-loops", "3"], "--n-loops is 2 in the run being resumed, 3 here"),
                (["--steps", "1"], "--steps 1: the run being resumed is already at step 2")]:
            status, err = _main_output([*run, *change, "--resume"])
            assert status == 2 and message in _one_line(err, "python -m looplm.train: error: "), (change, err)
        assert path.read_bytes() == before                                # nothing was written
        assert _main_output([*run, "--steps", "3", "--eval-every", "1", "--device", "cpu", "--resume"])[0] == 0
        assert read_checkpoint(path)["trainer"]["step"] == 3


_real_torch_save = torch.save


def _killed_on_save(number):
    """A torch.save that dies (KeyboardInterrupt, like a kill) half way through call `number`."""
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == number:
            f.write(b"the first bytes of a checkpoint")
            raise KeyboardInterrupt
        return _real_torch_save(obj, f, *args, **kwargs)

    return save


def test_resumed_run_writes_the_metrics_of_an_uninterrupted_run():
    with tempfile.TemporaryDirectory() as folder:
        straight, killed = Path(folder) / "straight", Path(folder) / "killed"
        run = [*_TINY_RUN, "--steps", "4"]
        assert _main_output([*run, "--out", str(straight)])[0] == 0
        rows = _read_jsonl(straight / "metrics.jsonl")
        assert [row["step"] for row in rows] == [1, 2, 3, 4]
        assert all({"loss", "lr", "grad_norm", "depth"} <= row.keys() for row in rows)
        assert ["eval_test_acc" in row for row in rows] == [False, True, False, True]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch, "save", _killed_on_save(2))              # the save at step 4
            with pytest.raises(KeyboardInterrupt):
                _main_output([*run, "--out", str(killed)])
        assert sorted(os.listdir(killed)) == ["checkpoint.pt", "metrics.jsonl"]
        assert [row["step"] for row in _read_jsonl(killed / "metrics.jsonl")] == [1, 2]   # the checkpoint's
        assert _main_output([*run, "--out", str(killed), "--resume"])[0] == 0
        assert _read_jsonl(killed / "metrics.jsonl") == rows


def test_metrics_are_valid_json_even_when_not_finite():
    with tempfile.TemporaryDirectory() as folder:
        history = [{"step": 1, "loss": 0.5, "lr": 1e-3, "consistency": float("nan")},
                   {"step": 2, "loss": 0.25, "lr": 1e-3, "grad_norm": float("inf"), "x": -float("inf")}]
        path = write_metrics(Path(folder) / "metrics.jsonl", history)
        assert _read_jsonl(path) == [{"step": 1, "loss": 0.5, "lr": 1e-3, "consistency": None},
                                     {"step": 2, "loss": 0.25, "lr": 1e-3, "grad_norm": None, "x": None}]
        assert os.listdir(folder) == ["metrics.jsonl"]


def test_loss_plot_is_written_atomically():
    from matplotlib.figure import Figure

    from looplm.train import _plot_history

    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_test_acc": 0.5}]

    def fails_half_way(self, target, **kwargs):
        if isinstance(target, (str, os.PathLike)):
            Path(target).write_bytes(b"half a plot")
        else:
            target.write(b"half a plot")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "loss.png"
        path.write_bytes(b"the previous plot")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Figure, "savefig", fails_half_way)
            with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
                _plot_history(history, path)
        assert path.read_bytes() == b"the previous plot" and os.listdir(folder) == ["loss.png"]
        _plot_history(history, path)
        assert path.read_bytes().startswith(b"\x89PNG") and os.listdir(folder) == ["loss.png"]

# --- book/04_backprop_through_the_loop.py, cell 163 ---
class _FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does (OSError ENOSPC)."""

    def __init__(self, f, room=1000):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def _full_disk_save(obj, f, *args, **kwargs):
    """torch.save onto a disk that fills up after 1000 bytes (torch then raises a RuntimeError from
    the OSError, as it does on a real full disk)."""
    return _real_torch_save(obj, _FullDisk(f), *args, **kwargs)


def test_full_disk_stops_the_run_and_leaves_whole_files():
    no_space = os.strerror(errno.ENOSPC)
    with tempfile.TemporaryDirectory() as folder:
        new, old = Path(folder) / "new", Path(folder) / "old"
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch, "save", _full_disk_save)
            status, err = _main_output([*_TINY_RUN, "--steps", "2", "--out", str(new)])
        line = _one_line(err, f"python -m looplm.train: stopped: could not write {new / 'checkpoint.pt'}: {no_space}")
        assert status == 1 and os.listdir(new) == [], line                # nothing half-written
        assert _main_output([*_TINY_RUN, "--steps", "2", "--out", str(old)])[0] == 0
        before = {name: (old / name).read_bytes() for name in os.listdir(old)}
        for name in ("checkpoint.pt", "metrics.jsonl", "loss.png"):       # what killed writes left
            (old / f".{name}.ab12cd34ef56.tmp").write_bytes(bytes(4096))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch, "save", _full_disk_save)
            status, err = _main_output([*_TINY_RUN, "--steps", "4", "--out", str(old), "--resume"])
        _one_line(err, f"python -m looplm.train: stopped: could not write {old / 'checkpoint.pt'}: {no_space}")
        # the last complete save is intact, and --resume removed the leftovers before training
        assert status == 1 and {name: (old / name).read_bytes() for name in os.listdir(old)} == before


def test_unwritable_out_gets_one_error_line():
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        a_file = folder / "a_file"
        a_file.write_text("not a folder")
        for out, resume, message in (
                (a_file, [], f"--out {a_file} is a file, not a folder"),
                (a_file, ["--resume"], f"--out {a_file} is a file, not a folder"),
                (a_file / "run", [], f"--out {a_file / 'run'} is not a folder this process can write to"),
                (a_file / "run", ["--resume"], f"--resume: there is no {a_file / 'run' / 'checkpoint.pt'}")):
            status, err = _main_output([*_TINY_RUN, "--steps", "2", "--out", str(out), *resume])
            assert status == 2 and message in _one_line(err, "python -m looplm.train: error: "), err
        read_only, resumable = folder / "read_only", folder / "resumable"
        read_only.mkdir()
        assert _main_output([*_TINY_RUN, "--steps", "2", "--out", str(resumable)])[0] == 0
        before = {name: (resumable / name).read_bytes() for name in os.listdir(resumable)}
        attempts = [(read_only, []), (read_only / "run", []), (resumable, ["--steps", "4", "--resume"])]

        def check():
            for out, extra in attempts:
                status, err = _main_output([*_TINY_RUN, "--steps", "2", "--out", str(out), *extra])
                line = _one_line(err, "python -m looplm.train: error: ")
                assert status == 2 and f"--out {out} is not a folder this process can write to" in line, err
            assert os.listdir(read_only) == []
            assert {name: (resumable / name).read_bytes() for name in os.listdir(resumable)} == before

        if getattr(os, "geteuid", lambda: 0)() != 0:       # root writes to read-only folders all the same
            for path in (read_only, resumable):
                path.chmod(0o555)
            try:
                check()
            finally:
                for path in (read_only, resumable):
                    path.chmod(0o755)
        # as root too: the file system refuses to create anything in the two folders
        real_open, real_mkdir = os.open, os.mkdir

        def refused(path):
            return any(Path(path).is_relative_to(p) for p in (read_only, resumable))

        def open_(path, flags, *args, **kwargs):
            if flags & os.O_CREAT and refused(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, *args, **kwargs)

        def mkdir(path, *args, **kwargs):
            if refused(path) and not Path(path).is_dir():
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_mkdir(path, *args, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "open", open_)
            patch.setattr(os, "mkdir", mkdir)
            check()


def test_memory_errors_get_one_line():
    train_module = importlib.import_module("looplm.train")
    allocation_failed = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                         "memory: you tried to allocate 1536000000 bytes. Error code 12 (Cannot allocate memory)")

    class TooLarge:
        def __init__(self, config):
            raise RuntimeError(allocation_failed)

    def no_memory_left(self):
        raise RuntimeError(allocation_failed)

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        status, err = _main_output([*_TINY_RUN, "--d-model", "100000000", "--out", str(out)])
        assert status == 2 and "d_model=100000000 makes this model too large" in _one_line(
            err, "python -m looplm.train: error: ")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train_module, "LoopLM", TooLarge)
            status, err = _main_output([*_TINY_RUN, "--out", str(out)])
        assert status == 2 and "the model of --d-model 8 and --n-core 1 does not fit in this machine's memory" in \
            _one_line(err, "python -m looplm.train: error: ")
        assert not out.exists()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train_module.Trainer, "_train_step", no_memory_left)
            status, err = _main_output([*_TINY_RUN, "--out", str(out)])
        assert status == 1 and "out of memory while training" in _one_line(err, "python -m looplm.train: stopped: ")
        assert os.listdir(out) == []

# --- book/04_backprop_through_the_loop.py, cell 181 ---
from looplm.bench import MinimalLoopedLM, bench_train, format_train_table, minimal_from_looplm


def test_minimal_model_matches_looplm_and_the_benchmark_runs():
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=40, d_model=32, n_heads=4, n_loops=3, max_seq_len=16))
    idx = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(minimal_from_looplm(model)(idx), model(idx).logits[-1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one pre-norm core block"):
        minimal_from_looplm(LoopLM(LoopLMConfig(vocab_size=40, d_model=32, n_heads=4, n_core=2)))
    result = bench_train(d_model=32, n_heads=4, n_loops=2, batch_size=2, seq_len=8, vocab_size=40,
                         steps=1, repeats=1)
    assert [row[0] for row in result["rows"]] == ["minimal looped model (plain PyTorch)",
                                                  "LoopLM + make_loop_loss()", "LoopLM + default_loss"]
    assert result["max_logit_difference"] <= 1e-6 and "overhead" in format_train_table(result)

# --- book/04_backprop_through_the_loop.py, cell 183 ---
from looplm.bench import BENCHMARKS, main as bench_main      # the package's (the notebook has its own copies)


def _bench_output(argv):
    """(exit status, stderr) of python -m looplm.bench's main(argv), its output captured."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = bench_main(argv)
    return status, err.getvalue()


def test_bench_bad_input_gets_one_error_line():
    cases = [(["--steps", "0"], "--steps must be >= 1, got 0"),
             (["--repeats", "0"], "--repeats must be >= 1, got 0"),
             (["--n-loops", "0"], "--n-loops must be >= 1, got 0"),
             (["--batch-size", "-1"], "--batch-size must be >= 1, got -1"),
             (["--d-model", "30", "--n-heads", "4"], "--n-heads 4 must divide --d-model 30"),
             (["--d-model", "12", "--n-heads", "4"], "--d-model / --n-heads = 3 must be even"),
             (["--device", "tpu"], "--device must be cpu or cuda (cuda:N), got 'tpu'")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: CUDA is not available on this machine"))
    for flags, message in cases:
        status, err = _bench_output(["train", *flags])
        assert status == 2 and message in _one_line(err, "python -m looplm.bench: error: "), (flags, err)

    errors = {"value": ValueError("--size must be > 0, got 0"), "type": TypeError("--size must be an int"),
              "missing": FileNotFoundError("--checkpoint: no checkpoint at x.pt"),
              "checkpoint": CheckpointError("--checkpoint: x.pt is not a looplm checkpoint"),
              "read-only": PermissionError(errno.EACCES, os.strerror(errno.EACCES), "plots/x.png"),
              "full": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "plots/x.png")}

    def run(args):
        raise errors[args.kind]

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(BENCHMARKS, "failing", ("raises the error it is told to", lambda p: p.add_argument("--kind"), run))
        for kind, error in errors.items():
            status, err = _bench_output(["failing", "--kind", kind])
            start = "python -m looplm.bench: stopped: " if kind == "full" else "python -m looplm.bench: error: "
            assert status == (1 if kind == "full" else 2) and _one_line(err, start) == start + str(error), err

# --- book/04_backprop_through_the_loop.py, cell 193 ---
def test_bad_arguments_get_clear_errors():
    model = _full_model()
    idx, targets = _batch()
    losses = model(idx, targets=targets).step_losses                     # (3, B, T)
    with pytest.raises(ValueError, match=r"one weight per step: 3 steps ran, got weights of shape \[2\]"):
        weighted_step_loss(losses, targets, [1.0, 2.0])
    with pytest.raises(ValueError, match="finite and non-negative"):
        weighted_step_loss(losses, targets, [1.0, -2.0, 1.0])
    with pytest.raises(ValueError, match="must not all be zero"):
        weighted_step_loss(losses, targets, [0, 0, 0])
    with pytest.raises(ValueError, match="step weights must be one of 'last', 'uniform', 'linear'"):
        step_weights("exponential", 3)
    with pytest.raises(ValueError, match="no position to learn"):
        weighted_step_loss(losses, torch.full_like(targets, IGNORE_INDEX))
    with pytest.raises(ValueError, match="grad_steps must be an int >= 1, got 0"):
        loop_forward(model, idx, grad_steps=0)
    with pytest.raises(ValueError, match="grad_steps must be <= n_loops: 3 steps run"):
        loop_forward(model, idx, grad_steps=4)
    with pytest.raises(ValueError, match="n_loops must be an int >= 1, got 0"):
        loop_forward(model, idx, n_loops=0)
    with pytest.raises(ValueError, match="readout must be 'all' or 'last'"):
        loop_forward(model, idx, readout="first")
    with pytest.raises(ValueError, match="checkpoint must be True or False"):
        loop_forward(model, idx, checkpoint="yes")
    with pytest.raises(ValueError, match="mean_steps must be a finite number > 0"):
        sample_depth(0)
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        sample_depth(4, sigma=-1)
    with pytest.raises(ValueError, match="explicit step weights need a fixed depth"):
        make_loop_loss(step_weights=[1, 1], sample_depth=3)
    with pytest.raises(ValueError, match="norm_penalty must be a finite number >= 0"):
        make_loop_loss(norm_penalty=float("nan"))
    with pytest.raises(ValueError, match="factor must be a finite number"):
        scale_core_grads(model, float("inf"))
