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

CLAIMS = [
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
]


@pytest.mark.parametrize("claim", CLAIMS, ids=str)
def test_prose_claim_matches_stored_output(claim):
    match = re.search(claim.phrase, prose(claim.chapter), flags=re.S)
    assert match, f"{claim}: the phrase is no longer in the prose; update the claim with the text"
    assert claim.holds(match), f"{claim}: the stored outputs do not show it. {claim.why}"
