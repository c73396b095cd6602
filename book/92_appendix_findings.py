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
# # Appendix B, continued: what the book measured
#
# The chapters answer their questions about trained models with experiments over three seeds,
# stored as results files (Appendix B). This page gathers them in one place: for every stored
# experiment, the chapter and section that ask its question, the setup in a line, the seeds,
# and the numbers the chapter's conclusions rest on, each as the mean ± half the range over the
# seeds (so the interval covers every seed).
#
# No measured number on this page is typed in by hand. Every one is computed, when the page
# is executed, from the files in `book/results/`, with the same `load_results`, `per_seed` and
# `summary` the chapters use; the setups are read from the experiments' own definitions in
# `looplm.experiments` where those hold them as values. When a results file is made again, the
# page's stored tables no longer match it and the test suite says so, until the page is
# executed again.
#
# What the page does not repeat are the numbers of single runs: one trained model's curve, a
# decoding speed measured on one machine, a table printed while a chapter trains live. Those
# live in their chapters, beside the code that made them.

# %% tags=["hide-input"]
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt

import looplm
from looplm.experiments import (CH03_MODELS, CH03_SPLITS, CH04_SPLITS, CH05_SPLITS, CH06_OBJECTIVES, CH07_SPLITS,
                                CH08_THRESHOLDS, CH09_MODELS)
from looplm.exits import EXIT_RULES
from looplm.results import load_results, per_seed, registered, results_dir, summary
from looplm.train import TrainConfig

BOOK = Path(looplm.__file__).resolve().parents[1] / "book"
print("looplm", looplm.__version__, "| results from", results_dir().relative_to(BOOK.parent))

# %% [markdown]
# ## The experiments
#
# Every results file, with the experiment that wrote it (from the registry of Appendix B),
# the chapter that owns it and the sections that report it. The sections, and the setup of
# each experiment in a line, are the one thing this page keeps by hand:

# %% tags=["hide-input"]
def splits_text(splits):
    """One line for a make_splits(...) dict: sizes, difficulties, the out-of-distribution range."""
    low, high = splits["max_difficulty"] + 1, splits["ood_max_difficulty"]
    ood = f"{low}" if low == high else f"{low} to {high}"
    return (f"{splits['task']} task, {splits['n_train']:,} training and {splits['n_test']:,} test programs of "
            f"1 to {splits['max_difficulty']} operations, out of distribution {ood}")


DEFAULTS = TrainConfig()
SECTIONS = {  # experiment -> (sections of its chapter that report it, its setup in one line)
    "looped-vs-stacked": (
        "3.8, 3.9",
        f"{splits_text(CH03_SPLITS)}; width-64, 4-head models: one block looped 4 times, 1 layer, 4 layers, "
        f"and the looped block with three kinds of input injection; {DEFAULTS.steps} steps of batch "
        f"{DEFAULTS.batch_size}"),
    "fixed-vs-random-depth": (
        "4.8",
        f"{splits_text(CH04_SPLITS)}; one width-64, 4-head block looped 4 times, trained for 600 steps of "
        f"batch 32 at depth 4, or at a depth drawn per batch with mean 4"),
    "exit-recipe": (
        "5.3, 5.4, 5.7 (run defined in C.9)",
        f"{splits_text(CH05_SPLITS)}, {CH05_SPLITS['n_val']} validation programs to choose the exit threshold; "
        f"one width-64, 4-head block looped 4 times, 600 steps of batch 32 per model, then 200 steps of "
        f"Stage II (the gate alone) for the gated ones"),
    "other-objectives": (
        "6.5",
        "chapter 5's splits and recipe: one Stage I model per seed (600 steps), then a copy of it fine-tuned "
        "for 150 steps with each objective: " + "; ".join(
            f"{name} with {', '.join(f'{k}={v}' for k, v in options.items())}"
            for name, (_, options) in CH06_OBJECTIVES.items())),
    "cache-strategies": (
        "7.9",
        f"{splits_text(CH07_SPLITS)}; one width-64, 4-head block looped 4 times with an exit gate, trained "
        f"with chapter 5's recipe (700 steps of Stage I, 200 of Stage II), then greedy decoding of the "
        f"{CH07_SPLITS['n_test']} test prompts under every cache and exit rule"),
    "exit-modes": (
        "8.9",
        f"chapter 7's model, splits and training; greedy decoding of the {CH07_SPLITS['n_test']} test prompts at "
        f"full depth, with the weighted readout, and with Q-exit at q = "
        f"{', '.join(map(str, CH08_THRESHOLDS))} when an exited token skips the deeper steps or still runs them"),
    "moe-loop": (
        "9.7, 9.8",
        f"{splits_text(CH03_SPLITS)}; chapter 3's width-64, 4-head models and training: a looped dense block, "
        f"a looped block with 8 experts (top-2, balanced over all steps, or per step), a looped dense block as "
        f"wide as the experts together, and 4 stacked dense layers"),
}


def cell(value, digits):
    if value is None:
        return "—"
    if isinstance(value, list):
        return f"{summary(value):.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def show(columns, rows):
    """columns: [(header, digits)]; rows: [[label cells..., values...]] -> a table, columns 2+ spaces apart."""
    text = [[header for header, _ in columns]] + [[cell(v, d) for v, (_, d) in zip(row, columns)] for row in rows]
    widths = [max(len(line[i]) for line in text) for i in range(len(columns))]
    for line in text:
        print("   ".join(c.ljust(w) if d is None else c.rjust(w) for c, w, (_, d) in zip(line, widths, columns)).rstrip())

# %% tags=["nbval-check-output"]
EXPERIMENTS = registered()
RESULTS = {path.stem: load_results(path.stem) for path in sorted(results_dir().glob("*.json"))}
missing = sorted(set(EXPERIMENTS) - set(RESULTS)), sorted(set(RESULTS) - set(SECTIONS))
assert missing == ([], []), f"experiments without a results file, files without a row here: {missing}"
ORDER = sorted(RESULTS, key=lambda name: (EXPERIMENTS[name].chapter, name))

show([("experiment", None), ("chapter", None), ("sections", None), ("seeds", None)],
     [[name, str(int(EXPERIMENTS[name].chapter)), SECTIONS[name][0], ", ".join(map(str, RESULTS[name]["seeds"]))]
      for name in ORDER])

# %% [markdown]
# Every table below is printed by one helper, `show` (defined with the setups above): a list of
# per-seed values becomes `summary(...)`, printed as mean ± half-range; a value that is the
# same in every seed (a parameter count) is printed once; "—" marks a quantity the row does
# not have. Each table's accuracies are also kept for the figure at the end.

# %%
HEADLINE = {}   # experiment -> [(row label, per-seed accuracies)], for the figure


def introduce(name):
    """The experiment's setup and seeds, above its table."""
    payload = RESULTS[name]
    print(textwrap.fill(f"{name}: {SECTIONS[name][1]}", width=100, subsequent_indent="  "))
    print(f"seeds {', '.join(map(str, payload['seeds']))}; mean ± half-range over them\n")


# %% [markdown]
# ## Looped against stacked (chapter 3)
#
# With the parameters of one block, how much of the accuracy of four distinct blocks does
# looping the one block four times recover, and how do input injection and the placement of
# the norms change that? {doc}`03_fixed_loops` answers it in sections 3.8 and 3.9.
# Accuracy is teacher-forced exact match of the last step's readout, on test programs and on
# longer programs than any in training; the last column runs the looped models to 8 steps,
# twice their trained depth.

# %% tags=["nbval-check-output"]
payload = RESULTS["looped-vs-stacked"]
introduce("looped-vs-stacked")
stored_models = payload["results"][str(payload["seeds"][0])]["models"]
assert set(stored_models) == set(CH03_MODELS), "the stored models are not chapter 3's"
rows = []
for name in CH03_MODELS:
    models = per_seed(payload, "models", name)
    at_8 = [m["test_curve"][7] for m in models] if "test_curve" in models[0] else None
    rows.append([name, models[0]["parameters"], models[0]["depth"], [m["test_acc"] for m in models],
                 [m["ood_acc"] for m in models], at_8])
show([("model", None), ("parameters", 0), ("depth", 0), ("test", 3), ("out of distribution", 3),
      ("test at 8 steps", 3)], rows)
HEADLINE["looped-vs-stacked"] = [(row[0], row[3]) for row in rows]

# %% [markdown]
# ## Fixed against randomized depth (chapter 4)
#
# Does training at a depth drawn anew for every batch, with the same mean of 4, keep the
# answer when the loop runs past the depth it was trained at? Section 4.8 of
# {doc}`04_backprop_through_the_loop` reads out the test accuracy after every step up to four
# times the trained depth; here are the trained depth and the deepest readout.

# %% tags=["nbval-check-output"]
payload = RESULTS["fixed-vs-random-depth"]
introduce("fixed-vs-random-depth")
rows = []
for name in payload["results"][str(payload["seeds"][0])]["runs"]:
    curves = per_seed(payload, "runs", name, "curve")
    deepest = len(curves[0])
    rows.append([name, per_seed(payload, "runs", name, "mean_depth"), [c[3] for c in curves], [c[-1] for c in curves]])
show([("training depth", None), ("mean depth in training", 2), ("test at 4 steps", 3),
      (f"test at {deepest} steps", 3)], rows)
HEADLINE["fixed-vs-random-depth"] = ([(f"{row[0]}, 4 steps", row[2]) for row in rows]
                                     + [(f"{row[0]}, {deepest} steps", row[3]) for row in rows])

# %% [markdown]
# ## An exit gate and when its loss starts (chapter 5)
#
# Does a gate trained with Ouro's two stages cost accuracy against the same model without a
# gate, and does it matter whether the gated loss (Eq. 4) weights the steps from the first
# update or only after the last step has been learned? {doc}`05_learning_when_to_stop`
# compares the four models in section 5.3 (their accuracy at the last step) and scores the
# gated ones with Q-exit in section 5.7, at the threshold $q$ chosen on the validation
# programs.

# %% tags=["nbval-check-output"]
RECIPE_RUNS = {"baseline": "no gate, last-step loss", "eq4": "Eq. 4 from the first update",
               "weights_only": "Eq. 4's final mass as fixed weights, no gate",
               "recipe": "the recipe: the last step first"}
payload = RESULTS["exit-recipe"]
introduce("exit-recipe")
assert set(payload["results"][str(payload["seeds"][0])]["runs"]) == set(RECIPE_RUNS)
rows = []
for run, label in RECIPE_RUNS.items():
    record = per_seed(payload, "runs", run)
    gated = "stage2" in record[0]
    last = len(record[0]["test_per_step"])
    rows.append([label, [r["test_per_step"][-1] for r in record],
                 [r["stage2"]["q_accuracy"] for r in record] if gated else None,
                 [r["stage2"]["q_steps"] for r in record] if gated else None])
show([("model", None), (f"test at step {last}", 3), ("Q-exit, Stage II gate", 3), ("steps per token", 2)], rows)
HEADLINE["exit-recipe"] = ([(f"{row[0]}, step {last}", row[1]) for row in rows]
                           + [(f"{row[0]}, Q-exit", row[2]) for row in rows if row[2] is not None])

# %% [markdown]
# ## Other ways to stop (chapter 6)
#
# Starting from one Stage I model, does a short fine-tune with ACT's ponder cost, PonderNet's
# prior or Gumbel sampling of the exit step change the accuracy, the spread of the exit
# distribution, or the steps the model uses? {doc}`06_other_ways_to_stop`, section 6.5. The
# entropy is that of the exit distribution $p$ on the last training batch; the accuracy and
# the steps are those of Q-exit at $q = 0.5$ on the test programs (for ACT, its own halting
# step).

# %% tags=["nbval-check-output"]
payload = RESULTS["other-objectives"]
introduce("other-objectives")
assert set(payload["results"][str(payload["seeds"][0])]["runs"]) == set(CH06_OBJECTIVES)
rows = [[name, per_seed(payload, "runs", name, "test_accuracy"), per_seed(payload, "runs", name, "entropy"),
         per_seed(payload, "runs", name, "test_steps")] for name in CH06_OBJECTIVES]
show([("objective", None), ("test accuracy", 3), ("entropy H(p)", 2), ("steps per token", 2)], rows)
HEADLINE["other-objectives"] = [(row[0], row[1]) for row in rows]

# %% [markdown]
# ## Caches and exit rules while decoding (chapter 7)
#
# When the gated model generates its answers token by token, what does each way of sharing
# the KV cache between loop steps, and each rule for stopping a token early, cost in accuracy,
# and how many steps does each token use? {doc}`07_inference`, section 7.9.
# Accuracy is exact match of the greedily decoded answer; each rule runs at the package's
# default threshold; the last column is one batch's cache (64 prompts), the same in every seed.

# %% tags=["nbval-check-output"]
payload = RESULTS["cache-strategies"]
introduce("cache-strategies")
by_seed = per_seed(payload, "rows")
rows = []
for i, first in enumerate(by_seed[0]):
    setting = [seed_rows[i] for seed_rows in by_seed]
    assert all((r["cache"], r["rule"]) == (first["cache"], first["rule"]) for r in setting)
    kib = {r["kib"] for r in setting}
    rows.append([first["cache"], first["rule"], str(EXIT_RULES[first["rule"]].default_threshold if first["rule"] in EXIT_RULES else "—"),
                 [r["accuracy"] for r in setting], [r["steps"] for r in setting],
                 f"{kib.pop():,.0f}" if len(kib) == 1 else [r["kib"] for r in setting]])
show([("cache", None), ("exit rule", None), ("threshold", None), ("accuracy", 3), ("steps per token", 2),
      ("cache KiB", 0)], rows)
HEADLINE["cache-strategies"] = [(f"{row[0]}, {row[1]}", row[3]) for row in rows]

# %% [markdown]
# ## Skip or select, while decoding (chapter 8)
#
# Does it matter whether a token that exits still runs the deeper steps and fills their cache
# entries (`exit_mode="select"`, Ouro's code), or skips them and leaves copies (`"skip"`)?
# {doc}`08_real_models`, section 8.9. The two modes can differ only in a row where a token runs
# deeper than an earlier generated one; the last two columns count those rows, and the rows whose
# readout logits differ from select's by more than $10^{-4}$.

# %% tags=["nbval-check-output"]
payload = RESULTS["exit-modes"]
introduce("exit-modes")
by_seed = per_seed(payload, "rows")
rows = []
for i, first in enumerate(by_seed[0]):
    setting = [seed_rows[i] for seed_rows in by_seed]
    assert all(r["setting"] == first["setting"] for r in setting)
    rows.append([first["setting"], [r["accuracy"] for r in setting], [r["readout"] for r in setting],
                 [r["deeper"] for r in setting] if "deeper" in first else None,
                 [r["differs"] for r in setting] if "differs" in first else None])
show([("setting", None), ("accuracy", 3), ("readout step", 2), ("rows with a deeper later token", 3),
      ("rows whose logits differ", 3)], rows)
HEADLINE["exit-modes"] = [(row[0], row[1]) for row in rows]

# %% [markdown]
# ## Experts inside the loop (chapter 9)
#
# Does a looped block gain from a mixture of experts, at equal compute per token or at equal
# weights? {doc}`09_mixture_of_experts`, sections 9.7 and 9.8. Accuracy is the last step's
# exact-match on held-out programs and on longer ones; "per token" counts the weights a token
# uses (2 of 8 experts).

# %% tags=["nbval-check-output"]
payload = RESULTS["moe-loop"]
introduce("moe-loop")
rows = [[name, per_seed(payload, "models", name, "parameters")[0], per_seed(payload, "models", name, "active")[0],
         per_seed(payload, "models", name, "test_acc"), per_seed(payload, "models", name, "ood_acc")]
        for name in CH09_MODELS]
show([("model", None), ("weights", 0), ("per token", 0), ("test accuracy", 3), ("out of distribution", 3)], rows)
HEADLINE["moe-loop"] = [(row[0], row[3]) for row in rows]

# %% [markdown]
# ## Every accuracy at a glance
#
# The accuracies of the tables above in one picture: each seed is a dot of its own colour,
# the mean a bar, so the spread between seeds that every comparison has to beat is in plain
# view. Where the dots of one seed sit on the same side in every row of an experiment, the
# seed moved the whole model, and a comparison within the seed is sharper than the ranges
# suggest.

# %%
sizes = [len(HEADLINE[name]) for name in ORDER]
fig, axes = plt.subplots(len(ORDER), 1, figsize=(8, 0.22 * sum(sizes) + 1.1 * len(ORDER)), sharex=True,
                         gridspec_kw={"height_ratios": sizes})
for ax, name in zip(axes, ORDER):
    labels = [label for label, _ in HEADLINE[name]]
    for y, (_, values) in enumerate(HEADLINE[name]):
        s = summary(values)
        ax.plot([s.low, s.high], [y, y], color="gray", linewidth=1)
        ax.scatter(values, [y] * len(values), s=14, c=[f"C{k}" for k in range(len(values))], zorder=3)
        ax.scatter([s.mean], [y], marker="|", s=160, color="black", zorder=4)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_title(f"{name} (chapter {int(EXPERIMENTS[name].chapter)})", fontsize=9, loc="left")
    ax.grid(axis="x", alpha=0.3)
axes[-1].set(xlim=(0, 1.02), xlabel="accuracy (bar: mean over the seeds)")
seeds = RESULTS[ORDER[0]]["seeds"]
axes[0].legend(handles=[plt.Line2D([], [], marker="o", linestyle="", color=f"C{k}", label=f"seed {seed}")
                        for k, seed in enumerate(seeds)], fontsize=7, loc="lower left")
plt.tight_layout()
plt.show()

# %% [markdown]
# What each chapter concluded from these rows, and with how much confidence, is in its prose:
# a difference counts there only where it is larger than the spread between seeds, and the
# claims that carry a conclusion are checked against these same files.
