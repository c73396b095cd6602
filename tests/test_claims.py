"""Numbers the prose states are numbers the stored outputs show.

Each claim names a chapter, a phrase of its prose (a regular expression over the markdown), and
the evidence: a function of the chapter's stored outputs (or of a stored results file) that must
hold. When a chapter is re-executed and its outputs move, the claims that no longer hold fail
here, which is the signal to re-read the prose.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jupytext
import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
RESULTS = BOOK / "results"


def notebook(chapter):
    """The stored notebook of the chapter whose file name starts with `chapter` ("05")."""
    (path,) = BOOK.glob(f"{chapter}_*.ipynb")
    return jupytext.read(path)


def prose(chapter):
    """The chapter's markdown, with every run of whitespace (line breaks too) made one space."""
    return " ".join(" ".join(c.source for c in notebook(chapter).cells if c.cell_type == "markdown").split())


def output_after(chapter, marker):
    """The text output of the first code cell whose source contains `marker`."""
    for cell in notebook(chapter).cells:
        if cell.cell_type == "code" and marker in cell.source:
            return "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                           for o in cell.get("outputs", []))
    raise AssertionError(f"chapter {chapter}: no code cell contains {marker!r}")


def results(name):
    return json.loads((RESULTS / f"{name}.json").read_text())


def numbers(text):
    return [float(x) for x in re.findall(r"-?\d+\.\d+|-?\d+", text)]


@dataclass
class Claim:
    chapter: str
    phrase: str                      # a regular expression the markdown must match
    holds: Callable[[re.Match], bool]   # evidence, given the match of the phrase
    why: str = ""

    def __str__(self):
        return f"chapter {self.chapter}: {self.phrase}"


def seed_summary(experiment, *keys, index=None):
    """f"{mean:.3f} ± {half-range:.3f}" over the seeds of a stored value (or of value[index])."""
    payload = results(experiment)
    values = []
    for seed in payload["seeds"]:
        value = payload["results"][str(seed)]
        for key in keys:
            value = value[key]
        values.append(value if index is None else value[index])
    return values


def pm(values, digits=3):
    mean, spread = sum(values) / len(values), (max(values) - min(values)) / 2
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def ch03(model, key, index=None):
    return seed_summary("looped-vs-stacked", "models", model, key, index=index)


LOOPED, ONE, FOUR = "looped 1 block × 4", "same parameters: 1 layer", "same compute: 4 layers"

def ch05(*keys, index=None):
    return seed_summary("exit-recipe", "runs", *keys, index=index)


def ch04(name, key, index=None):
    return seed_summary("fixed-vs-random-depth", "runs", name, key, index=index)


def mean(values, digits=2):
    return f"{sum(values) / len(values):.{digits}f}"


FIXED, RANDOM = "fixed depth 4", "random depth, mean 4"

def ch06(name, key, index=None):
    return seed_summary("other-objectives", "runs", name, key, index=index)


OBJECTIVES6 = ("Stage I (control)", "ACT", "PonderNet", "Gumbel")


def ch07_rows(cache, rule, key):
    """A value of one (cache, exit rule) row of the stored cache-strategies results, per seed."""
    payload = results("cache-strategies")
    return [next(r[key] for r in payload["results"][str(s)]["rows"] if (r["cache"], r["rule"]) == (cache, rule))
            for s in payload["seeds"]]


def ch07_table(cache, rule):
    """One row of the stored decode table of chapter 7, as a list of its numbers."""
    for line in output_after("07", "decode_result = bench_decode(").splitlines():
        parts = line.split()
        if parts[:2] == [cache, rule]:
            return parts[2:]
    raise AssertionError(f"no row {cache} {rule} in the stored decode table")


def ch08(setting, key):
    """Per-seed values of `key` for one setting of the exit-modes experiment."""
    payload = results("exit-modes")
    rows = [payload["results"][str(seed)]["rows"] for seed in payload["seeds"]]
    return [next(r[key] for r in seed_rows if r["setting"] == setting) for seed_rows in rows]


def ch09(model, key):
    return seed_summary("moe-loop", "models", model, key)


def ch09_routing(model, key, field):
    return [r[field] for r in seed_summary("moe-loop", "models", model, key)]


def spreads(model, key):
    import torch

    out = []
    for load in ch09_routing(model, key, "load"):
        load = torch.tensor(load)
        out.append((0.5 * (load - load.mean(0)).abs().sum(1)).tolist())
    return out


def bench09(what, contestant):
    """The relative time of one row of chapter 9's stored benchmark table (what: a regex)."""
    match = re.search(what + r"\s+" + contestant + r"[^\n]*?(\S+)\n", output_after("09", '"looplm.bench", "moe"') + "\n")
    assert match, (what, contestant)
    return match[1]


def layer09(n):
    return rf"MoE layer, {n} tokens, fwd \+ bwd"


def pct(values):
    return f"{100 * sum(values) / len(values):.1f}"


CLAIMS = [
    # chapter 6: other objectives, 3 seeds
    Claim("06", r"end at the same accuracy \((\S+) to (\S+) on average, and within 4 points of one another in each seed\)",
          lambda m: (m[1], m[2]) == (min(mean(ch06(o, "test_accuracy"), 3) for o in OBJECTIVES6),
                                     max(mean(ch06(o, "test_accuracy"), 3) for o in OBJECTIVES6))
          and all(max(ch06(o, "test_accuracy")[i] for o in OBJECTIVES6) - min(ch06(o, "test_accuracy")[i] for o in OBJECTIVES6)
                  <= 0.04 for i in range(3))),
    Claim("06", r"the control keeps its bonus \((\S+ ± \S+)\), PonderNet's weak KL term \(\$\\beta = 0\.01\$\) keeps "
                r"less \((\S+)\), ACT less still \((\S+)\), and Gumbel .* \((\S+) of it, entropy (\S+)\)",
          lambda m: m[1] == pm(ch06("Stage I (control)", "entropy"), 2)
          and (m[2], m[3], m[5]) == tuple(mean(ch06(o, "entropy")) for o in ("PonderNet", "ACT", "Gumbel"))
          and m[4] == mean(ch06("Gumbel", "mass", 3))
          and all(ch06(o, "entropy")[i] < ch06("Stage I (control)", "entropy")[i] for o in OBJECTIVES6[1:] for i in range(3))),
    Claim("06", r"Q-exit uses the fewest steps on the control model in every seed \((\S+ ± \S+)\)",
          lambda m: m[1] == pm(ch06("Stage I (control)", "test_steps"), 2)
          and all(ch06("Stage I (control)", "test_steps")[i] <= min(ch06(o, "test_steps")[i] for o in OBJECTIVES6[1:])
                  for i in range(3))),
    Claim("06", r"In seed 0 alone ACT moved mass to step 2 \((\S+), the run above\)",
          lambda m: m[1] == f"{ch06('ACT', 'mass', 1)[0]:.2f}" and max(ch06("ACT", "mass", 1)[1:]) < 0.4),
    # chapter 7: the stored decode table (one run) and the cache strategies over 3 seeds
    Claim("07", r"The exact cache at full depth scores (\S+) on the held-out examples\. The first-step cache is the worst "
                r"of the shared ones \((\S+)\), as in Ouro's Table 14; the last-step and averaged caches lose less \((\S+), (\S+)\)",
          lambda m: (m[1], m[2], m[3], m[4]) == tuple(ch07_table(c, "none")[1] for c in ("exact", "first", "last", "average"))),
    Claim("07", r"Q-exit at \$q = 0\.5\$ scores (\S+) with (\S+) steps per token",
          lambda m: [m[1], m[2]] == ch07_table("exact", "q_exit")[1:3]),
    Claim("07", r"Q-exit decoded\s+(\S+) and (\S+) times as fast as full depth at batch 1 and 64, against an ideal of (\S+), .*"
                r"fixed depth 2, where all rows exit together, ran (\S+) and (\S+) times as fast",
          lambda m: [m[1], m[2], m[3]] == ch07_table("exact", "q_exit")[5:8] and [m[4], m[5]] == ch07_table("exact", "fixed")[5:7]),
    Claim("07", r"confidence \(1\.64 steps per token, ideal (\S+)\) ran (\S+) and (\S+) times as fast at batch 1 and "
                r"64, and fixed depth 2 (\S+) and (\S+) times",
          lambda m: ch07_table("exact", "confidence")[2] == "1.64"
          and [m[2], m[3], m[1]] == ch07_table("exact", "confidence")[5:8]
          and [m[4], m[5]] == ch07_table("exact", "fixed")[5:7]),
    Claim("07", r"In the stored run, Q-exit decoded\s+(\S+) times as fast as full depth at batch 1 and (\S+) times at "
                r"batch 64 \(ideal (\S+)\)\. KL and hidden-state change, .* \((\S+) and (\S+) at batch 1\), and fixed "
                r"depth 2 ran (\S+) and (\S+) times as fast",
          lambda m: [m[1], m[2], m[3]] == ch07_table("exact", "q_exit")[5:8]
          and [m[4], m[5]] == [ch07_table("exact", "kl")[5], ch07_table("exact", "hidden_change")[5]]
          and [m[6], m[7]] == ch07_table("exact", "fixed")[5:7]),
    Claim("07", r"spread (?:over|by) (\d+)%",
          lambda m: int(m[1]) == round(100 * (max(full := [int(ch07_table(c, "none")[3]) for c in
                                                         ("exact", "last", "first", "average", "mod-2")]) / min(full) - 1))),
    Claim("07", r"\((\d+) to (\d+) tokens per second at batch 1\)",
          lambda m: (m[1], m[2]) == tuple(str(f(int(ch07_table(c, "none")[3]) for c in ("exact", "last", "first", "average", "mod-2")))
                                          for f in (min, max))),
    Claim("07", r"first-step cache is the worst of the shared ones, as in Ouro's Table 14 \((\S+ ± \S+) against (\S+ ± \S+) "
                r"for the exact cache; in each seed it is the lowest of the five caches at full depth\)\. The last-step, "
                r"averaged and mod-2 caches lose little \((\S+), (\S+) and (\S+)\)",
          lambda m: (m[1], m[2]) == (pm(ch07_rows("first", "none", "accuracy")), pm(ch07_rows("exact", "none", "accuracy")))
          and (m[3], m[4], m[5]) == tuple(mean(ch07_rows(c, "none", "accuracy"), 3) for c in ("last", "average", "mod-2"))
          and all(ch07_rows("first", "none", "accuracy")[i] == min(ch07_rows(c, "none", "accuracy")[i]
                  for c in ("exact", "last", "first", "average", "mod-2")) for i in range(3))),
    Claim("07", r"confidence and fixed depth 2 stop at about 2 steps and lose (\d+) and (\d+) points on average",
          lambda m: (m[1], m[2]) == tuple(f"{100 * (sum(ch07_rows('exact', 'none', 'accuracy')) - sum(ch07_rows('exact', r, 'accuracy'))) / 3:.0f}"
                                          for r in ("confidence", "fixed"))),
    # Appendix C.4: the training benchmark's stored table
    Claim("04a", r"In the stored run, `LoopLM` with `make_loop_loss\(\)` was (\S+)% (slower|faster) than the minimal "
                 r"model, within that noise, and with `default_loss` it was (\S+)% slower",
          lambda m: re.search(r"LoopLM \+ make_loop_loss\(\)\s.*" + ("\\+" if m[2] == "slower" else "-") + re.escape(m[1])
                              + r"%\n.*LoopLM \+ default_loss\s.*\+" + re.escape(m[3]) + "%",
                              output_after("04a", '"looplm.bench", "train"')) is not None),
    # chapter 4: fixed against randomized depth, 3 seeds
    Claim("04", r"\(at least 0\.99 at 4 steps in every seed, (\S+) at 3 and (\S+) at 5 on average\)",
          lambda m: min(ch04(FIXED, "curve", 3)) >= 0.99 and (m[1], m[2]) == (mean(ch04(FIXED, "curve", 2)),
                                                                                mean(ch04(FIXED, "curve", 4)))),
    Claim("04", r"(\S+) at 10 steps and (\S+) at 16 on average",
          lambda m: (m[1], m[2]) == (mean(ch04(FIXED, "curve", 9)), mean(ch04(FIXED, "curve", 15)))),
    Claim("04", r"its best mean accuracy is (\S+), at (\d+) steps",
          lambda m: m[1] == mean(ch04(RANDOM, "curve", int(m[2]) - 1))
          and all(sum(ch04(RANDOM, "curve", i)) <= sum(ch04(RANDOM, "curve", int(m[2]) - 1)) for i in range(16))),
    Claim("04", r"to (\S+) at 16 steps, and at 16 steps it is ahead of the fixed-depth model in every seed, by "
                r"(\S+) to (\S+)\.",
          lambda m: m[1] == mean(ch04(RANDOM, "curve", 15))
          and [round(r - f, 2) for r, f in zip(ch04(RANDOM, "curve", 15), ch04(FIXED, "curve", 15))]
          and min(r - f for r, f in zip(ch04(RANDOM, "curve", 15), ch04(FIXED, "curve", 15))) > 0
          and f"{min(r - f for r, f in zip(ch04(RANDOM, 'curve', 15), ch04(FIXED, 'curve', 15))):.2f}" == m[2]
          and f"{max(r - f for r, f in zip(ch04(RANDOM, 'curve', 15), ch04(FIXED, 'curve', 15))):.2f}" == m[3]),
    Claim("04", r"about (\d+)% of its batches run one or two steps",
          lambda m: f"{100 * sum(ch04(RANDOM, 'shallow_share')) / 3:.0f}" == m[1]),
    # chapter 5: the baseline, the diagnosis, the recipe, 3 seeds
    Claim("05", r"it is best at step 2 \((\S+ ± \S+) over three seeds\) and worse at step 4 \((\S+ ± \S+)\)",
          lambda m: (m[1], m[2]) == (pm(ch05("eq4", "test_per_step", index=1)), pm(ch05("eq4", "test_per_step", index=3)))
          and sum(ch05("eq4", "test_per_step", index=3)) < sum(ch05("eq4", "test_per_step", index=1))),
    Claim("05", r"The model without a gate reaches (\S+ ± \S+) at step 4\. Its early readouts are poor \((\S+)\s+at step 1\)",
          lambda m: m[1] == pm(ch05("baseline", "test_per_step", index=3))
          and m[2] == mean(ch05("baseline", "test_per_step", index=0), 3)),
    Claim("05", r"It falls short the same way: (\S+ ± \S+) at its best step, (\S+ ± \S+) at step 4",
          lambda m: m[1] == pm(ch05("weights_only", "test_per_step", index=2))
          and m[2] == pm(ch05("weights_only", "test_per_step", index=3))),
    Claim("05", r"model keeps what the baseline has: (\S+ ± \S+) at step 4 over three seeds, the baseline's (\S+ ± \S+)",
          lambda m: m[1] == pm(ch05("recipe", "test_per_step", index=3)) and m[2] == pm(ch05("baseline", "test_per_step", index=3))),
    Claim("05", r"\((\S+) at step 2 and (\S+) at step 3, against (\S+) and (\S+)\)",
          lambda m: (m[1], m[2], m[3], m[4]) == tuple(mean(ch05(run, "test_per_step", index=i), 3) for run, i in
                                                       (("recipe", 1), ("recipe", 2), ("baseline", 1), ("baseline", 2)))),
    Claim("05", r"falls from (\S+) to (\S+) and the mass on step 4 from (\S+) to (\S+), so the entropy \*rises\*, "
                r"from (\S+) to (\S+)\.",
          lambda m: (m[1], m[2]) == (mean(ch05("recipe", "stage1", "depth")), mean(ch05("recipe", "stage2", "depth")))
          and (m[3], m[4]) == (mean(ch05("recipe", "stage1", "mass", index=3)), mean(ch05("recipe", "stage2", "mass", index=3)))
          and (m[5], m[6]) == (mean(ch05("recipe", "stage1", "entropy")), mean(ch05("recipe", "stage2", "entropy")))),
    Claim("05", r"two-stage model scores (\S+ ± \S+) on the test set with (\S+ ± \S+) steps per answer token, against "
                r"(\S+ ± \S+) for the model without a gate",
          lambda m: (m[1], m[2], m[3]) == (pm(ch05("recipe", "stage2", "q_accuracy")), pm(ch05("recipe", "stage2", "q_steps"), 2),
                                           pm(ch05("baseline", "test_per_step", index=3)))),
    Claim("05", r"exits much earlier \((\S+) steps\) and is about 20 points worse",
          lambda m: m[1] == mean(ch05("eq4", "stage2", "q_steps"))
          and 0.15 < (sum(ch05("recipe", "stage2", "q_accuracy")) - sum(ch05("eq4", "stage2", "q_accuracy"))) / 3 < 0.25),
    Claim("05", r"does as well as the Stage II gate \((\S+ ± \S+) at (\S+)\s+steps\)",
          lambda m: m[1] == pm(ch05("recipe", "stage1", "q_accuracy")) and m[2] == mean(ch05("recipe", "stage1", "q_steps"))),
    Claim("05", r"Q-exit with the Stage II gate has the highest mean \((\S+ ± \S+)\), ahead of KL \((\S+)\)",
          lambda m: m[1] == pm(ch05("recipe", "budgets", "Q-exit, Stage II gate", index=2))
          and m[2] == mean(ch05("recipe", "budgets", "KL (Huginn)", index=2), 3)),
    Claim("05", r"Past the trained depth the last step gets worse: (\S+ ± \S+) at 4 steps, (\S+) at 5 and (\S+ ± \S+) at 8",
          lambda m: m[1] == pm([r[3]["test_last"] for r in seed_summary("exit-recipe", "runs", "recipe", "loop_budget")])
          and m[3] == pm([r[7]["test_last"] for r in seed_summary("exit-recipe", "runs", "recipe", "loop_budget")])),
    Claim("03", r"0\.93 on the test set at 5 steps, 0\.92 at 4\), then it falls, to 0\.72 at 8",
          lambda m: "test 0.04 0.34 0.80 0.92 0.93 0.88 0.81 0.72" in output_after("03", "looped_curves = {")),
    Claim("03", r"1-layer model reaches (\S+ ± \S+) test", lambda m: m[1] == pm(ch03(ONE, "test_acc"))),
    Claim("03", r"the looped model reaches (\S+ ± \S+):", lambda m: m[1] == pm(ch03(LOOPED, "test_acc"))),
    Claim("03", r"reaches (\S+ ± \S+), and every one of its seeds is above every seed of the looped model "
                r"\((\S+) against at most (\S+)\)",
          lambda m: m[1] == pm(ch03(FOUR, "test_acc")) and f"{min(ch03(FOUR, 'test_acc')):.3f}" == m[2]
          and f"{max(ch03(LOOPED, 'test_acc')):.3f}" == m[3] and min(ch03(FOUR, "test_acc")) > max(ch03(LOOPED, "test_acc"))),
    Claim("03", r"accuracy: (\S+ ± \S+) for 4 layers, (\S+ ± \S+) looped, (\S+ ± \S+) for 1 layer",
          lambda m: (m[1], m[2], m[3]) == (pm(ch03(FOUR, "ood_acc")), pm(ch03(LOOPED, "ood_acc")), pm(ch03(ONE, "ood_acc")))),
    Claim("03", r"models at the trained depth: (\S+ ±\s+\S+) test and (\S+ ± \S+) out-of-distribution",
          lambda m: " ".join(m[1].split()) == pm(ch03("concat, pre", "test_acc")) and m[2] == pm(ch03("concat, pre", "ood_acc"))),
    Claim("03", r"falls as soon as it runs past the trained depth \((\S+) at 5 steps, (\S+) at 8\)",
          lambda m: (m[1], m[2]) == (f"{sum(ch03('concat, pre', 'test_curve', 4)) / 3:.2f}",
                                     f"{sum(ch03('concat, pre', 'test_curve', 7)) / 3:.2f}")),
    Claim("03", r"did not learn the task in 500 steps in any seed\s+\((\S+ ± \S+) test",
          lambda m: m[1] == pm(ch03("add, pre", "test_acc")) and max(ch03("add, pre", "test_acc")) < 0.3),
    Claim("03", r"RMS of (\d+) to (\d+) at step\s+4 against (\S+) to (\S+) for the plain loop",
          lambda m: (m[1], m[2]) == (f"{min(ch03('add, pre', 'rms', 3)):.0f}", f"{max(ch03('add, pre', 'rms', 3)):.0f}")
          and (m[3], m[4]) == (f"{min(ch03(LOOPED, 'rms', 3)):.1f}", f"{max(ch03(LOOPED, 'rms', 3)):.1f}")),
    Claim("03", r"trains \((\S+ ± \S+) test, (\S+ ± \S+) out of distribution\)",
          lambda m: (m[1], m[2]) == (pm(ch03("add, sandwich", "test_acc")), pm(ch03("add, sandwich", "ood_acc")))),
    Claim("03", r"\((\S+) and (\S+) test accuracy at 8 steps on average, with overlapping seed\s+ranges\)",
          lambda m: (m[1], m[2]) == (f"{sum(ch03(LOOPED, 'test_curve', 7)) / 3:.2f}",
                                     f"{sum(ch03('add, sandwich', 'test_curve', 7)) / 3:.2f}")
          and min(ch03(LOOPED, "test_curve", 7)) < max(ch03("add, sandwich", "test_curve", 7))),
    Claim("03", r"\((\S+) against (\S+) test accuracy\) and far ahead of the\s+single block it is made of \((\S+)\)",
          lambda m: (m[1], m[2], m[3]) == tuple(f"{sum(v) / 3:.3f}" for v in (ch03(LOOPED, "test_acc"),
                                                 ch03(FOUR, "test_acc"), ch03(ONE, "test_acc")))),
    # chapter 8: the tiny random Ouro where the modes part, and the feedback switch
    Claim("08", r"Token 4 needs two steps, and at step 2 it reads those copies: its logits differ by (\S+)\. The tokens "
                r"after it exit at step 1 again",
          lambda m: "readout steps [1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1]" in output_after("08", "runs = {mode: generate(tiny")
          and f"['0.000', '0.000', '0.000', '{m[1]}', '0.000'" in output_after("08", "runs = {mode: generate(tiny")),
    Claim("08", r"by about a fifth of a logit here, with small random weights",
          lambda m: [round(x, 1) for x in numbers(output_after("08", "normed, raw = from_ouro").split(":")[-1])] == [0.0, 0.2, 0.2]),
    # chapter 8: select against skip, 3 seeds
    Claim("08", r"the two modes decoded the same answer for all 300 prompts in every seed",
          lambda m: all(ch08(f"q={q} skip", "answers") == ch08(f"q={q} select", "answers") for q in (0.3, 0.5, 0.7, 0.9))),
    Claim("08", r"(\S+)% of them on average at \$q = 0\.3\$ \((\S+)% to (\S+)% by seed\), (\S+)% at \$q = 0\.5\$, "
                r"none above; their logits differ",
          lambda m: (m[1], m[4]) == (pct(ch08("q=0.3 skip", "deeper")), pct(ch08("q=0.5 skip", "deeper")))
          and (m[2], m[3]) == (f"{100 * min(ch08('q=0.3 skip', 'deeper')):.1f}", f"{100 * max(ch08('q=0.3 skip', 'deeper')):.1f}")
          and not any(ch08("q=0.7 skip", "deeper") + ch08("q=0.9 skip", "deeper"))
          and all(d > 0 for d, e in zip(ch08("q=0.3 skip", "differs"), ch08("q=0.3 skip", "deeper")) if e > 0)),
    Claim("08", r"Q-exit at \$q = 0\.7\$ kept full-depth accuracy in every seed \((\S+)\) with about (\S+) steps per token",
          lambda m: ch08("q=0.7 select", "accuracy") == ch08("full depth", "accuracy")
          and m[1] == mean(ch08("full depth", "accuracy"), 3) and m[2] == mean(ch08("q=0.7 select", "readout"), 1)),
    Claim("08", r"lost accuracy in every seed \((\S+) against (\S+)\)",
          lambda m: all(w < f for w, f in zip(ch08("weighted", "accuracy"), ch08("full depth", "accuracy")))
          and (m[1], m[2]) == (mean(ch08("weighted", "accuracy"), 3), mean(ch08("full depth", "accuracy"), 3))),
    Claim("09", r"On a CPU the grouped layer was (\S+) times as fast as the loop on 128 tokens and (\S+) times on 1024, and "
                r"a MoE training step cost (\S+) times a dense one",
          lambda m: [m[1], m[2]] == [f"{1 / float(bench09(layer09(n), 'grouped')):.1f}" for n in (128, 1024)]
          and m[3] == bench09("training step, batch 16 x 64", "MoE")),
    # chapter 9: experts in the loop, 3 seeds
    Claim("09", r"The looped MoE scored (\S+ ± \S+) on held-out programs against (\S+ ± \S+) for the looped dense model "
                r"with the same compute per token, within the spread of the seeds, and out of distribution it was lower on "
                r"average \((\S+) against (\S+)\), though not in every seed",
          lambda m: (m[1], m[2]) == (pm(ch09("looped MoE", "test_acc")), pm(ch09("looped dense", "test_acc")))
          and (m[3], m[4]) == (mean(ch09("looped MoE", "ood_acc"), 3), mean(ch09("looped dense", "ood_acc"), 3))
          and max(ch09("looped MoE", "test_acc")) >= min(ch09("looped dense", "test_acc"))
          and not all(a < b for a, b in zip(ch09("looped MoE", "ood_acc"), ch09("looped dense", "ood_acc")))),
    Claim("09", r"in one wide MLP, did no better \((\S+ ± \S+)\), and the stacked model with four distinct layers was "
                r"the best, as in chapter 3 \((\S+ ± \S+), and (\S+) out of distribution\)",
          lambda m: m[1] == pm(ch09("looped dense, as many weights", "test_acc"))
          and (m[2], m[3]) == (pm(ch09("stacked dense", "test_acc")), mean(ch09("stacked dense", "ood_acc"), 3))
          and all(sum(ch09("stacked dense", "test_acc")) > sum(ch09(n, "test_acc"))
                  for n in ("looped dense", "looped MoE", "looped MoE, per-step balance", "looped dense, as many weights"))),
    Claim("09", r"Balancing per step against pooled over the steps, (\S+ ± \S+) against (\S+ ± \S+): the ranges overlap",
          lambda m: (m[1], m[2]) == (pm(ch09("looped MoE, per-step balance", "test_acc")), pm(ch09("looped MoE", "test_acc")))
          and min(ch09("looped MoE, per-step balance", "test_acc")) <= max(ch09("looped MoE", "test_acc"))),
    Claim("09", r"Each step's load lies (\S+) to (\S+) away from the average load over the four steps with the pooled "
                r"balance, and (\S+) to (\S+) with the per-step one",
          lambda m: [m[1], m[2]] == [f"{f(sum(s[t] for s in spreads('looped MoE', 'routing')) / 3 for t in range(4)):.2f}" for f in (min, max)]
          and [m[3], m[4]] == [f"{f(sum(s[t] for s in spreads('looped MoE, per-step balance', 'routing')) / 3 for t in range(4)):.2f}"
                               for f in (min, max)]),
    Claim("09", r"rises from (\S+) \(step 1 to 2\) to (\S+) \(step 3 to 4\)\. Run past the trained depth, the routing "
                r"freezes: from step 7 to 8, (\S+) of the tokens keep their expert, the load drifts away from the mean again "
                r"\((\S+) at step 8\), and accuracy falls from (\S+) at 4 steps to (\S+) at 8",
          lambda m: [m[1], m[2]] == [mean([k[i] for k in ch09_routing("looped MoE", "routing", "keep")]) for i in (0, 2)]
          and m[3] == mean([k[6] for k in ch09_routing("looped MoE", "routing_8", "keep")])
          and m[4] == f"{sum(s[7] for s in spreads('looped MoE', 'routing_8')) / 3:.2f}"
          and (m[5], m[6]) == (mean(ch09("looped MoE", "test_acc"), 3), mean(ch09("looped MoE", "test_acc_8"), 3))),
    Claim("09", r"In the stored run the grouped layer took (\S+) of the loop's time on 128 tokens \((\S+) times as fast\) "
                r"and (\S+) on 1024 \((\S+) times\)",
          lambda m: [m[1], m[3]] == [bench09(layer09(n), "grouped") for n in (128, 1024)]
          and [m[2], m[4]] == [f"{1 / float(m[1]):.1f}", f"{1 / float(m[3]):.1f}"]),
    Claim("09", r"A training step of the looped MoE cost (\S+) times the dense step at equal active weights, within the 1\.5 "
                r"aimed for; greedy decoding cost (\S+) and (\S+) times at batch 1 and 16",
          lambda m: m[1] == bench09("training step, batch 16 x 64", "MoE") and float(m[1]) <= 1.5
          and [m[2], m[3]] == [bench09(f"decoding 32 tokens, batch {b}", "MoE") for b in (1, 16)]),
    # chapter 10: Triton kernels, all under the interpreter
    Claim("10", r"The fused kernel moves (\d+) tensors where the unfused pair moves (\d+)",
          lambda m: [int(m[1]), int(m[2])] == [int(line.split("total ")[1]) for line in output_after("10", "def passes(")
                                               .splitlines()[::-1] if "total" in line]),
    Claim("10", r"masking took (\S+) to (\S+) times as long as indexing in all three draws",
          lambda m: (lambda r: [m[1], m[2]] == [f"{min(r):.2f}", f"{max(r):.2f}"] and min(r) > 1)(
              numbers(next(line for line in output_after("10", '"kernels", "--device", "cpu"').splitlines()
                           if line.startswith("run all rows, masked update")))[-3:])),
    Claim("10", r"the kernel model equals the torch model within \$10\^\{-5\}\$ in outputs and every gradient",
          lambda m: (lambda xs: len(xs) >= 20 and max(xs) <= 1e-5)(
              [float(x) for x in re.findall(r"\d\.\de[-+]\d\d", output_after("10", "for name, options in LAYOUTS.items():"))])),
    Claim("10", r"ten training steps give loss curves that agree within \$10\^\{-7\}\$",
          lambda m: all(float(x) <= 1e-7 for x in re.findall(r"'(\d\.\de[-+]\d\d)'",
                                                             output_after("10", "curves = {")))),
    # chapter 11: many processes, 2 gloo ranks
    Claim("11", r"Every hand-written and library version matches one process to within \$10\^\{-14\}\$",
          lambda m: (lambda rows: all(float(r.split()[-2]) <= 1e-14 and float(r.split()[-1]) <= 1e-14
                                      for r in rows if not r.startswith("ddp, model wrapped"))
                     and any(float(r.split()[-1]) > 1e-3 for r in rows if r.startswith("ddp, model wrapped")))(
              [line for line in output_after("11", 'launch("data_parallel_equals_one_process"').splitlines()
               if line[:1].isalpha() and not line.startswith(("way", "bucketed:"))])),
    Claim("11", r"With the core its own unit and resharded, a step does \$1 \+ 2S\$ all-gathers",
          lambda m: all(int(line.split()[-2]) == {"resharded": 1 + 2 * int(line.split()[-3]),
                                                  "kept": 1 + int(line.split()[-3]),
                                                  "unit": 1}[line.split()[-4]]
                        for line in output_after("11", 'launch("fsdp_collectives"').splitlines()[1:] if line.strip())),
    # Appendix C, the multi-process command line: every run within about 1e-7 of one process
    Claim("11a", r"Every multi-process run logs the one-process losses to within about \$10\^\{-7\}\$, relative",
          lambda m: (lambda worst: len(worst) == 5 and max(worst) <= 5e-7)(
              [float(line.split()[-1]) for line in output_after("11a", "RUNS = {").splitlines()[1:] if line.strip()])),
]


@pytest.mark.parametrize("claim", CLAIMS, ids=str)
def test_prose_claim_matches_stored_output(claim):
    match = re.search(claim.phrase, prose(claim.chapter), flags=re.S)
    assert match, f"{claim}: the phrase is no longer in the prose; update the claim with the text"
    assert claim.holds(match), f"{claim}: the stored outputs do not show it. {claim.why}"


# The findings page (Appendix B, continued: book/92_appendix_findings) prints no number of its own:
# it has a table for every results file, and every mean ± half-range in its tables is the file's.

def findings_table(name):
    """The stored table that the findings page prints for results file `name`: a list of rows, each a
    list of its cells (the page separates cells by at least two spaces), the header row first."""
    text = output_after("92", f'RESULTS["{name}"]')
    assert text.startswith(f"{name}: "), f"the findings page's table for {name} does not start with its setup"
    _, table = text.split("\n\n", 1)
    return [re.split(r"\s{2,}", line.strip()) for line in table.splitlines() if line.strip()]


def findings_rows(name, key=lambda cells: cells[0]):
    rows = findings_table(name)[1:]
    return {key(cells): cells for cells in rows}


def test_findings_page_lists_every_results_file():
    files = sorted(path.stem for path in RESULTS.glob("*.json"))
    assert files, "no results files"
    listed = output_after("92", 'show([("experiment"').splitlines()[1:]
    assert sorted(line.split()[0] for line in listed) == files, "the findings page must list every results file"
    for name in files:
        seeds = ", ".join(map(str, results(name)["seeds"]))
        assert any(line.split()[0] == name and line.endswith(seeds) for line in listed), f"{name}: seeds {seeds}"
        assert f"seeds {seeds}; mean ± half-range" in output_after("92", f'RESULTS["{name}"]'), name
        assert len(findings_table(name)) > 1, f"{name}: the findings page prints no rows"


def test_findings_tables_are_the_results_files():
    models = results("looped-vs-stacked")["results"]["0"]["models"]
    rows = findings_rows("looped-vs-stacked")
    assert set(rows) == set(models)
    for model, cells in rows.items():
        assert cells[1] == f"{models[model]['parameters']:,}"
        assert cells[3:5] == [pm(ch03(model, "test_acc")), pm(ch03(model, "ood_acc"))], model
        assert cells[5] == (pm(ch03(model, "test_curve", 7)) if "test_curve" in models[model] else "—"), model

    rows = findings_rows("fixed-vs-random-depth")
    assert set(rows) == set(results("fixed-vs-random-depth")["results"]["0"]["runs"])
    for run, cells in rows.items():
        assert cells[1:] == [pm(ch04(run, "mean_depth"), 2), pm(ch04(run, "curve", 3)), pm(ch04(run, "curve", 15))], run

    labels = {"no gate, last-step loss": "baseline", "Eq. 4 from the first update": "eq4",
              "Eq. 4's final mass as fixed weights, no gate": "weights_only", "the recipe: the last step first": "recipe"}
    rows = findings_rows("exit-recipe")
    assert sorted(labels[label] for label in rows) == sorted(results("exit-recipe")["results"]["0"]["runs"])
    for label, cells in rows.items():
        run = labels[label]
        gated = run in ("eq4", "recipe")
        assert cells[1:] == [pm(ch05(run, "test_per_step", index=3)),
                             pm(ch05(run, "stage2", "q_accuracy")) if gated else "—",
                             pm(ch05(run, "stage2", "q_steps"), 2) if gated else "—"], label

    rows = findings_rows("other-objectives")
    assert set(rows) == set(results("other-objectives")["results"]["0"]["runs"])
    for objective, cells in rows.items():
        assert cells[1:] == [pm(ch06(objective, "test_accuracy")), pm(ch06(objective, "entropy"), 2),
                             pm(ch06(objective, "test_steps"), 2)], objective

    rows = findings_rows("moe-loop")
    assert set(rows) == set(results("moe-loop")["results"]["0"]["models"])
    for model, cells in rows.items():
        first = results("moe-loop")["results"]["0"]["models"][model]
        assert cells[1:] == [f"{first['parameters']:,}", f"{first['active']:,}", pm(ch09(model, "test_acc")),
                             pm(ch09(model, "ood_acc"))], model

    runs = [results("exit-modes")["results"][str(seed)]["rows"] for seed in results("exit-modes")["seeds"]]
    rows = findings_rows("exit-modes")
    assert sorted(rows) == sorted(r["setting"] for r in runs[0])
    for i, first in enumerate(runs[0]):
        values = {key: [run[i][key] for run in runs] for key in ("accuracy", "readout", "deeper", "differs")
                  if key in first}
        expected = [pm(values["accuracy"]), pm(values["readout"], 2)]
        expected += [pm(values[k]) if k in values else "—" for k in ("deeper", "differs")]
        assert rows[first["setting"]][1:] == expected, first["setting"]

    rows = findings_rows("cache-strategies", key=lambda cells: (cells[0], cells[1]))
    assert sorted(rows) == sorted((r["cache"], r["rule"]) for r in results("cache-strategies")["results"]["0"]["rows"])
    for (cache, rule), cells in rows.items():
        assert cells[3:5] == [pm(ch07_rows(cache, rule, "accuracy")), pm(ch07_rows(cache, rule, "steps"), 2)], (cache, rule)
