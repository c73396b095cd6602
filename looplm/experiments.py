# Generated from book/03_fixed_loops.py, book/04_backprop_through_the_loop.py, book/05a_appendix_adaptive.py, book/06_other_ways_to_stop.py, book/07_inference.py, book/08_real_models.py, book/09_mixture_of_experts.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['CH03_SPLITS', 'CH03_MODELS', 'LOOPED_VS_STACKED', 'CH04_SPLITS', 'FIXED_VS_RANDOM_DEPTH', 'CH05_SPLITS', 'CH05_BUDGETS', 'ch05_rules', 'rule_curves', 'best_at_budgets', 'EXIT_RECIPE', 'CH06_OBJECTIVES', 'OTHER_OBJECTIVES', 'CH07_SPLITS', 'CACHE_STRATEGIES_EXPERIMENT', 'CH08_THRESHOLDS', 'exit_mode_quality', 'EXIT_MODES_EXPERIMENT', 'CH09_MODELS', 'active_parameters', 'MOE_LOOP_EXPERIMENT']
# fmt: on

import copy
import dataclasses
import time

import torch

from looplm.adaptive import AdaptiveLoss, exit_entropy, expected_depth, q_exit_steps
from looplm.backprop import make_loop_loss
from looplm.bench import DECODE_SETTINGS, decode_quality
from looplm.data import (IGNORE_INDEX, TASK_VOCAB, answer_accuracy, decode_answer, encode_examples,
                         make_splits, make_task)
from looplm.diagnostics import hidden_norms, step_changes
from looplm.exits import (ConfidenceExit, FixedDepth, HiddenChangeExit, KLExit, QExit, exit_steps, mean_steps,
                          pick_exit_threshold, select_exit_logits)
from looplm.generate import generate
from looplm.model import LinearExitGate, LoopLM, LoopLMConfig
from looplm.moe import routing_summary
from looplm.objectives import act_halting
from looplm.results import Experiment, register
from looplm.train import (TrainConfig, Trainer, stage2_config, task_accuracy, task_batches, train_stage1,
                          train_stage2, train_two_stage)

# --- book/03_fixed_loops.py:971 (cell 76) ---
CH03_SPLITS = dict(task="stack", n_train=5000, n_test=500, max_difficulty=6, ood_max_difficulty=9, seed=0)
CH03_MODELS = {  # name -> the LoopLMConfig changes of a width-64, 4-head model
    "looped 1 block × 4": dict(n_core=1, n_loops=4),
    "same parameters: 1 layer": dict(n_core=1, n_loops=1),
    "same compute: 4 layers": dict(n_core=4, n_loops=1),
    "add, pre": dict(injection="add"),
    "add, sandwich": dict(injection="add", norm_style="sandwich"),
    "concat, pre": dict(injection="concat"),
}


def _ch03_trainer(seed, changes):
    """Chapter 3's run: a width-64 LoopLM on the stack split, TrainConfig() defaults, seeded."""
    splits = make_splits(**CH03_SPLITS)
    torch.manual_seed(seed)
    model = LoopLM(LoopLMConfig(TASK_VOCAB.vocab_size, 64, 4, **changes))
    config = TrainConfig(seed=seed, eval_every=0, progress=False)
    return Trainer(model, task_batches(splits, batch_size=config.batch_size), config), splits


def _ch03_run(seed, max_loops=8):
    out, prefix = {}, None
    for name, changes in CH03_MODELS.items():
        trainer, splits = _ch03_trainer(seed, changes)
        trainer.run()
        model, losses = trainer.model, [row["loss"] for row in trainer.history]
        record = {"parameters": sum(p.numel() for p in model.parameters()),
                  "depth": model.config.effective_depth(),
                  "final_loss": sum(losses[-50:]) / 50,
                  "losses": [round(sum(losses[i:i + 10]) / 10, 6) for i in range(0, len(losses), 10)]}
        for split in ("test", "ood"):
            record[f"{split}_acc"] = task_accuracy(model, getattr(splits, split))[-1].item()
        if model.config.n_loops > 1:   # the looped ones, run past their trained depth
            for split in ("test", "ood"):
                record[f"{split}_curve"] = task_accuracy(model, getattr(splits, split), n_loops=max_loops).tolist()
            with torch.no_grad():
                hidden = model(encode_examples(splits.test).idx, n_loops=max_loops, return_hidden=True).hidden
            record["rms"] = hidden_norms(hidden).mean(dim=(1, 2)).tolist()          # steps 1..8
            record["change"] = step_changes(hidden).mean(dim=(1, 2)).tolist()       # steps 2..8
        prefix = losses[:20] if prefix is None else prefix     # the first model's first steps
        out[name] = record
    return {"models": out, "prefix": prefix}


def _ch03_prefix(seed, n_steps):
    trainer, _ = _ch03_trainer(seed, CH03_MODELS["looped 1 block × 4"])
    trainer.run(until=n_steps)
    return [row["loss"] for row in trainer.history]


LOOPED_VS_STACKED = register(Experiment("looped-vs-stacked", "03", "chapter 3: looped vs stacked models, and injection and norm "
                    "placement, on the stack task", _ch03_run, _ch03_prefix))

# --- book/04_backprop_through_the_loop.py:1363 (cell 111) ---
CH04_SPLITS = dict(task="stack", n_train=5000, n_test=500, max_difficulty=4, ood_max_difficulty=5, seed=0)
CH04_STEPS, CH04_MAX_LOOPS = 600, 16


def _ch04_trainer(seed, randomized):
    splits = make_splits(**CH04_SPLITS)
    torch.manual_seed(seed)
    model = LoopLM(LoopLMConfig(TASK_VOCAB.vocab_size, 64, 4, n_loops=4, max_seq_len=16))
    loss_fn = make_loop_loss(sample_depth=3, seed=seed) if randomized else make_loop_loss()
    trainer = Trainer(model, task_batches(splits.train, batch_size=32),
                      TrainConfig(steps=CH04_STEPS, seed=seed, progress=False), loss_fn=loss_fn)
    return trainer, splits


def _ch04_run(seed):
    runs = {}
    for name, randomized in (("fixed depth 4", False), ("random depth, mean 4", True)):
        trainer, splits = _ch04_trainer(seed, randomized)
        trainer.run()
        depths = [int(row["depth"]) for row in trainer.history]
        runs[name] = {"curve": task_accuracy(trainer.model, splits.test, n_loops=CH04_MAX_LOOPS).tolist(),
                      "mean_depth": sum(depths) / len(depths), "max_depth": max(depths),
                      "shallow_share": sum(d <= 2 for d in depths) / len(depths),
                      "losses": [row["loss"] for row in trainer.history]}
    return {"runs": runs, "prefix": runs["fixed depth 4"]["losses"][:20]}


def _ch04_prefix(seed, n_steps):
    trainer, _ = _ch04_trainer(seed, randomized=False)
    trainer.run(until=n_steps)
    return [row["loss"] for row in trainer.history]


FIXED_VS_RANDOM_DEPTH = register(Experiment(
    "fixed-vs-random-depth", "04", "chapter 4: fixed against randomized training depth, accuracy at 1 to 16 steps",
    _ch04_run, _ch04_prefix))

# --- book/05a_appendix_adaptive.py:920 (cell 37) ---
CH05_SPLITS = dict(task="stack", n_train=4000, n_test=300, max_difficulty=5, ood_max_difficulty=7, seed=0, n_val=300)
CH05_BUDGETS = (1.5, 2.0, 2.5, 4.0)   # mean steps per answer token; 4.0 = any


def ch05_rules():
    """Section 5.7's sweeps: rule name -> (which gate's record, the thresholds from stop-at-once to never)."""
    q_values = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
    return {
        "Q-exit, Stage II gate": ("stage2", [QExit(q) for q in q_values]),
        "Q-exit, Stage I gate": ("stage1", [QExit(q) for q in q_values]),
        "confidence": ("stage2", [ConfidenceExit(c) for c in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999)]),
        "KL (Huginn)": ("stage2", [KLExit(e) for e in (3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 5e-4)]),
        "hidden-state change": ("stage2", [HiddenChangeExit(e) for e in (2.0, 1.0, 0.7, 0.5, 0.4, 0.3, 0.1, 0.03)]),
        "fixed depth": ("stage2", [FixedDepth(n) for n in (1, 2, 3, 4)]),
    }


def rule_curves(records, targets):
    """For each rule of ch05_rules: sorted (mean steps, exact match) points. records: "stage1"/"stage2"
    -> LoopOutput with hidden states, on the examples whose targets are given."""
    mask = targets != IGNORE_INDEX
    curves = {}
    for name, (which, rules) in ch05_rules().items():
        points = []
        for rule in rules:
            steps = exit_steps(rule, records[which])
            correct = answer_accuracy(select_exit_logits(records[which].logits, steps), targets)
            points.append((mean_steps(steps, mask), correct.float().mean().item()))
        curves[name] = sorted(points)
    return curves


def best_at_budgets(points, budgets=CH05_BUDGETS):
    """The best exact match among points with mean steps <= each budget (None where none fits)."""
    return [max((a for s, a in points if s <= budget + 1e-9), default=None) for budget in budgets]


def _ch05_setup():
    task, splits = make_task("stack"), make_splits(**CH05_SPLITS)
    seq_len = task.max_seq_len(7)
    data = {name: encode_examples(getattr(splits, name), seq_len=seq_len) for name in ("test", "val", "ood")}
    return task, splits, seq_len, data


def _ch05_config(seed, steps):
    return TrainConfig(steps=steps, batch_size=32, lr=5e-3, min_lr=5e-4, warmup_steps=50, weight_decay=0.0,
                       eval_every=steps, seed=seed, progress=False)


def _ch05_model(seed, gate, seq_len):
    torch.manual_seed(seed)
    return LoopLM(LoopLMConfig(TASK_VOCAB.vocab_size, 64, 4, n_loops=4, exit_gate=gate, max_seq_len=seq_len))


@torch.no_grad()
def _per_step(model, data):
    return answer_accuracy(model(data.idx).logits, data.targets).float().mean(1).tolist()


@torch.no_grad()
def _gate_report(model, data):
    """On the test set: H(p), E[t], the exit mass per step, and Q-exit at the validation-picked q."""
    out, mask = model(data["test"].idx), data["test"].targets != IGNORE_INDEX
    count = mask.sum().item()
    q, _ = pick_exit_threshold(model, data["val"])
    steps = q_exit_steps(out.gate, q)
    correct = answer_accuracy(select_exit_logits(out.logits, steps), data["test"].targets)
    return {"entropy": (exit_entropy(out.exit_probs) * mask).sum().item() / count,
            "depth": (expected_depth(out.exit_probs) * mask).sum().item() / count,
            "mass": ((out.exit_probs * mask).sum((1, 2)) / count).tolist(),
            "q": q, "q_accuracy": correct.float().mean().item(), "q_steps": mean_steps(steps, mask)}


def _history_points(trainer, every=150):
    keys = ("entropy", "depth", "last_loss", *(f"mass_{t}" for t in range(1, 5)))
    return [{"step": r["step"], **{k: r[k] for k in keys}} for r in trainer.history
            if r["step"] == 1 or r["step"] % every == 0]


@torch.no_grad()
def _difficulty_and_budget(task, stage1_model, stage2_model, data, seq_len):
    """Section 5.7's other two measurements on one seed's models (Q-exit at q = 0.5)."""
    by_difficulty = []
    for difficulty in range(1, 8):
        batch = encode_examples(task.sample(200, difficulty, seed=f"depth/{difficulty}"), seq_len=seq_len)
        mask = batch.targets != IGNORE_INDEX
        row = {"difficulty": difficulty}
        for name, model in (("stage1", stage1_model), ("stage2", stage2_model)):
            out = model(batch.idx)
            steps = q_exit_steps(out.gate, 0.5)
            row[f"{name}_steps"] = ((steps * mask).sum(1) / mask.sum(1)).mean().item()
            row[f"{name}_accuracy"] = answer_accuracy(select_exit_logits(out.logits, steps),
                                                      batch.targets).float().mean().item()
        by_difficulty.append(row)
    by_budget = []
    for n_loops in range(1, 9):
        row = {"n_loops": n_loops}
        for split in ("test", "ood"):
            out = stage2_model(data[split].idx, n_loops=n_loops)
            steps = q_exit_steps(out.gate, 0.5)
            row[f"{split}_last"] = answer_accuracy(out.logits[-1], data[split].targets).float().mean().item()
            row[f"{split}_qexit"] = answer_accuracy(select_exit_logits(out.logits, steps),
                                                    data[split].targets).float().mean().item()
            row[f"{split}_steps"] = mean_steps(steps, data[split].targets != IGNORE_INDEX)
        by_budget.append(row)
    return by_difficulty, by_budget


def _two_stages(seed, batches, seq_len, data, warm_steps, last_weight):
    model = _ch05_model(seed, True, seq_len)
    stage1 = train_stage1(model, batches, _ch05_config(seed, 600), 0.1, warm_steps, last_weight)
    after_stage1 = copy.deepcopy(model)
    train_stage2(model, batches, stage2_config(_ch05_config(seed, 800), 200))
    record = {"test_per_step": _per_step(after_stage1, data["test"]), "history": _history_points(stage1),
              "stage1": _gate_report(after_stage1, data), "stage2": _gate_report(model, data)}
    return after_stage1, model, record


def _ch05_run(seed):
    task, splits, seq_len, data = _ch05_setup()
    batches = task_batches(splits.train, 32, seq_len)
    baseline = Trainer(_ch05_model(seed, False, seq_len), batches, _ch05_config(seed, 600))
    baseline.run()
    runs = {"baseline": {"test_per_step": _per_step(baseline.model, data["test"]),
                         "val_per_step": _per_step(baseline.model, data["val"])}}
    _, _, runs["eq4"] = _two_stages(seed, batches, seq_len, data, warm_steps=0, last_weight=0.0)
    weights = runs["eq4"]["history"][-1]
    weights = [weights[f"mass_{t}"] for t in range(1, 5)]            # where Eq. 4 put the mass at the end
    fixed = Trainer(_ch05_model(seed, False, seq_len), batches, _ch05_config(seed, 600),
                    loss_fn=make_loop_loss(step_weights=weights))
    fixed.run()
    runs["weights_only"] = {"weights": weights, "test_per_step": _per_step(fixed.model, data["test"])}
    stage1_model, stage2_model, runs["recipe"] = _two_stages(seed, batches, seq_len, data, warm_steps=300,
                                                             last_weight=0.5)
    with torch.no_grad():
        records = {"stage1": stage1_model(data["test"].idx, return_hidden=True),
                   "stage2": stage2_model(data["test"].idx, return_hidden=True)}
    curves = rule_curves(records, data["test"].targets)
    runs["recipe"]["budgets"] = {name: best_at_budgets(points) for name, points in curves.items()}
    runs["recipe"]["difficulty"], runs["recipe"]["loop_budget"] = _difficulty_and_budget(
        task, stage1_model, stage2_model, data, seq_len)
    return {"runs": runs, "prefix": [row["loss"] for row in baseline.history[:20]]}


def _ch05_prefix(seed, n_steps):
    task, splits, seq_len, _ = _ch05_setup()
    trainer = Trainer(_ch05_model(seed, False, seq_len), task_batches(splits.train, 32, seq_len),
                      _ch05_config(seed, 600))
    trainer.run(until=n_steps)
    return [row["loss"] for row in trainer.history]


EXIT_RECIPE = register(Experiment("exit-recipe", "05", "chapter 5: the baseline, Eq. 4 from the first update, "
                                  "its step weights alone, and the recipe; exit rules, depth and budgets",
                                  _ch05_run, _ch05_prefix))

# --- book/06_other_ways_to_stop.py:331 (cell 25) ---
CH06_OBJECTIVES = {"Stage I (control)": ("stage1", dict(beta=0.1)), "ACT": ("act", dict(tau=0.01)),
                   "PonderNet": ("pondernet", dict(lambda_p=0.5, beta=0.01)), "Gumbel": ("gumbel", dict(tau=1.0))}


def _ch06_setup(seed):
    task, splits = make_task("stack"), make_splits("stack", 4000, 300, 5, 7, seed=0)
    seq_len = task.max_seq_len(7)
    torch.manual_seed(seed)
    model = LoopLM(LoopLMConfig(TASK_VOCAB.vocab_size, 64, 4, n_loops=4, exit_gate=True, max_seq_len=seq_len))
    config = TrainConfig(steps=600, batch_size=32, lr=5e-3, min_lr=5e-4, warmup_steps=50, weight_decay=0.0,
                         eval_every=600, seed=seed, progress=False)
    return model, splits, task_batches(splits.train, 32, seq_len), config, seq_len


def _ch06_run(seed):
    model, splits, batches, config, seq_len = _ch06_setup(seed)
    stage1 = train_stage1(model, batches, config, beta=0.1, warm_steps=300, last_weight=0.5)
    test = encode_examples(splits.test, seq_len=seq_len)
    mask = test.targets != IGNORE_INDEX
    runs = {}
    for name, (objective, options) in CH06_OBJECTIVES.items():
        copy_ = copy.deepcopy(model)
        tune = TrainConfig(steps=150, batch_size=32, lr=2e-3, min_lr=2e-4, warmup_steps=10, weight_decay=0.0,
                           eval_every=150, seed=seed + 2, progress=False)
        trainer = Trainer(copy_, batches, tune, loss_fn=AdaptiveLoss(objective, **options))
        trainer.run()
        with torch.no_grad():
            out = copy_(test.idx)
        steps = act_halting(out.gate)[1] if objective == "act" else q_exit_steps(out.gate, 0.5)
        last = trainer.history[-1]
        runs[name] = {"mass": [last[f"mass_{t}"] for t in range(1, 5)], "entropy": last["entropy"],
                      "depth": last["depth"], "test_steps": mean_steps(steps, mask),
                      "test_accuracy": answer_accuracy(select_exit_logits(out.logits, steps),
                                                       test.targets).float().mean().item()}
    return {"runs": runs, "prefix": [row["loss"] for row in stage1.history[:20]]}


def _ch06_prefix(seed, n_steps):
    model, _, batches, config, _ = _ch06_setup(seed)
    trainer = Trainer(model, batches, config, loss_fn=AdaptiveLoss("stage1", beta=0.1, last_weight=1.0))
    trainer.run(until=n_steps)
    return [row["loss"] for row in trainer.history]


OTHER_OBJECTIVES = register(Experiment("other-objectives", "06", "chapter 6: Stage I, ACT, PonderNet and Gumbel "
                                       "fine-tunes of one Stage I model", _ch06_run, _ch06_prefix))

# --- book/07_inference.py:1647 (cell 61) ---
CH07_SPLITS = dict(task="stack", n_train=4000, n_test=300, max_difficulty=5, ood_max_difficulty=7, seed=0)


def _ch07_setup(seed, steps=900):
    task, splits = make_task("stack"), make_splits(**CH07_SPLITS)
    seq_len = task.max_seq_len(7)
    torch.manual_seed(seed)
    model = LoopLM(LoopLMConfig(TASK_VOCAB.vocab_size, 64, 4, n_loops=4, exit_gate=True, max_seq_len=seq_len))
    config = TrainConfig(steps=steps, batch_size=32, lr=5e-3, min_lr=5e-4, warmup_steps=50, weight_decay=0.0,
                         eval_every=steps, seed=seed, progress=False)
    return model, splits, task_batches(splits.train, 32, seq_len), config


def _ch07_run(seed):
    model, splits, batches, config = _ch07_setup(seed)
    trainer = train_two_stage(model, batches, config, stage2_steps=200)
    return {"rows": decode_quality(model, splits.test), "test_per_step": task_accuracy(model, splits.test).tolist(),
            "prefix": [row["loss"] for row in trainer.history[:20]]}


def _ch07_prefix(seed, n_steps):
    # train_two_stage's first updates: Stage I (700 of the 900) starts on the last step's loss
    model, _, batches, config = _ch07_setup(seed)
    trainer = Trainer(model, batches, dataclasses.replace(config, steps=700),
                      loss_fn=AdaptiveLoss("stage1", beta=0.1, last_weight=1.0))
    trainer.run(until=n_steps)
    return [row["loss"] for row in trainer.history]


CACHE_STRATEGIES_EXPERIMENT = register(Experiment(
    "cache-strategies", "07", "chapter 7: accuracy and steps of every cache strategy and exit rule while decoding",
    _ch07_run, _ch07_prefix))

# --- book/08_real_models.py:1506 (cell 56) ---
CH08_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


def exit_mode_quality(model, examples, thresholds=CH08_THRESHOLDS, batch_size=100, vocab=TASK_VOCAB):
    """Greedy decoding of `examples` at full depth, with the weighted readout, and with Q-exit at
    each threshold in both exit modes. -> rows: setting, accuracy, readout (mean readout step of
    the new tokens), answers (the decoded answers); the "skip" rows also have deeper (the share of
    rows where a token runs deeper than an earlier decoded one, the only way the modes can differ)
    and differs (the share of rows whose readout logits differ from "select"'s by more than 1e-4)."""
    model.eval()
    prompts = [vocab.encode(e.prompt) for e in examples]
    max_new = max(len(e.answer) for e in examples) + 1
    settings = [("full depth", None, "skip", False), ("weighted", None, "select", True)]
    settings += [(f"q={q} {mode}", q, mode, False) for q in thresholds for mode in ("select", "skip")]
    rows, selected = [], []
    for name, q, mode, weighted in settings:
        answers, steps, deeper, logits = [], [], [], []
        for start in range(0, len(prompts), batch_size):
            res = generate(model, prompts[start:start + batch_size], max_new, stop_tokens=[vocab.eos_id],
                           exit_rule=None if q is None else QExit(q), exit_mode=mode, weighted_exit=weighted)
            answers += [decode_answer(row, vocab) for row in res.new_tokens]
            steps.append(res.steps[res.steps > 0])
            later = res.steps[:, 1:]                          # decided at fed-back positions
            deeper.append(((later[:, 1:] > later[:, :-1].cummin(1).values) & (later[:, 1:] > 0)).any(1))
            logits.append(res.logits)
        row = {"setting": name, "answers": answers, "readout": torch.cat(steps).float().mean().item(),
               "accuracy": sum(a == e.answer for a, e in zip(answers, examples)) / len(examples)}
        if mode == "select":
            selected = logits
        elif q is not None:
            gap = torch.cat([(a - b).abs().amax((1, 2)) for a, b in zip(logits, selected)])
            row.update(deeper=torch.cat(deeper).float().mean().item(), differs=(gap > 1e-4).float().mean().item())
        rows.append(row)
    return rows


def _ch08_run(seed):
    model, splits, batches, config = _ch07_setup(seed)
    trainer = train_two_stage(model, batches, config, stage2_steps=200)
    return {"rows": exit_mode_quality(model, splits.test), "prefix": [row["loss"] for row in trainer.history[:20]]}


EXIT_MODES_EXPERIMENT = register(Experiment(
    "exit-modes", "08", "chapter 8: accuracy of Q-exit decoding when exited tokens skip or still run the deeper steps",
    _ch08_run, _ch07_prefix))

# --- book/09_mixture_of_experts.py:863 (cell 34) ---
CH09_MODELS = {  # name -> the LoopLMConfig changes of chapter 3's width-64, 4-head model
    "looped dense": dict(n_loops=4),
    "looped MoE": dict(n_loops=4, mlp="moe", n_experts=8, top_k=2),
    "looped MoE, per-step balance": dict(n_loops=4, mlp="moe", n_experts=8, top_k=2, balance_pool="step"),
    "looped dense, as many weights": dict(n_loops=4, d_hidden=704),
    "stacked dense": dict(n_core=4, n_loops=1),
}


def active_parameters(model):
    """Weights a token uses: all of a dense model's; a MoE block uses top_k of its experts."""
    total, c = sum(p.numel() for p in model.parameters()), model.config
    if c.mlp == "dense":
        return total
    n_experts, top_k, d_expert = c.moe_shape
    blocks = c.n_prelude + c.n_core + c.n_coda
    return total - blocks * (n_experts - top_k) * 3 * c.d_model * d_expert


def _ch09_run(seed):
    out, prefix = {}, None
    for name, changes in CH09_MODELS.items():
        trainer, splits = _ch03_trainer(seed, changes)
        start = time.perf_counter()
        trainer.run()
        seconds = time.perf_counter() - start
        model, losses = trainer.model.eval(), [row["loss"] for row in trainer.history]
        record = {"parameters": sum(p.numel() for p in model.parameters()), "active": active_parameters(model),
                  "seconds_per_update": seconds / len(losses)}
        for split in ("test", "ood"):
            record[f"{split}_acc"] = task_accuracy(model, getattr(splits, split))[-1].item()
        if model.config.mlp == "moe":
            batch = encode_examples(splits.test)
            real = batch.idx != TASK_VOCAB.pad_id
            record["routing"] = routing_summary(model, batch.idx, real)
            record["routing_8"] = routing_summary(model, batch.idx, real, n_loops=8)
            record["test_acc_8"] = task_accuracy(model, splits.test, n_loops=8)[-1].item()
        prefix = losses[:20] if prefix is None else prefix
        out[name] = record
    return {"models": out, "prefix": prefix}


MOE_LOOP_EXPERIMENT = register(Experiment(
    "moe-loop", "09", "chapter 9: looped MoE against looped and stacked dense models, and its routing per step",
    _ch09_run, _ch03_prefix))
