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
# # Appendix B: Results over several seeds
#
# A conclusion drawn from one training run is a conclusion about one seed. Two tiny models
# trained from different initial weights, on batches drawn in a different order, can differ
# by several points of accuracy, and a difference between two recipes means something only
# when it is larger than that. So every comparison the book draws from a difference rests on
# at least three seeds, and is reported as a mean with its spread.
#
# Three seeds of every model of a chapter do not fit into the minute or so a chapter may take
# to execute on a laptop CPU. This appendix builds the small piece of plumbing that solves it:
#
# - an **experiment** is a function of a seed, registered by the chapter that owns it;
# - `python -m looplm.results run NAME` runs it for each seed and writes the numbers to
#   `book/results/NAME.json`, recording the command, the package version, the seeds and the
#   machine. Only that command writes those files;
# - the chapter loads the file and plots it. Executing a notebook never writes a results
#   file, so chapters can run in parallel without racing;
# - a test re-runs the first steps of one seed live and checks them against the stored
#   numbers: exactly on the machine that stored them, within a stated tolerance on any other.

# %% tags=["hide-input"]
#| default_exp results
#| export
import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import looplm
from looplm import __version__

# %% [markdown]
# ## Experiments
#
# An experiment has a name, the chapter it belongs to, and two functions:
#
# - `run(seed) -> dict`: the whole run for one seed. The dict holds plain numbers, lists and
#   strings (it is written as JSON), and a key `"prefix"`: the training losses of the first
#   `prefix_steps` optimizer steps of its first model;
# - `prefix(seed, n_steps) -> list`: just those first losses, computed the same way but
#   cheaply, so that a test can re-run them.
#
# Runs use one CPU thread. With one thread the order of every floating-point sum is fixed, so
# a run gives the same numbers bit for bit on the same machine, whatever its number of cores.

# %%
#| export
EXPERIMENTS = {}          # name -> Experiment; the chapters register theirs in looplm.experiments
PREFIX_RTOL = 1e-3        # tolerance of the prefix check on another machine than the one that stored


@dataclass(frozen=True)
class Experiment:
    """A multi-seed experiment: run(seed) -> JSON-able dict (with "prefix"), prefix(seed, n) -> list."""

    name: str
    chapter: str
    help: str
    run: Callable
    prefix: Callable
    prefix_steps: int = 20
    seeds: tuple = (0, 1, 2)


def register(experiment):
    """Add `experiment` to EXPERIMENTS and return it. A name may be registered again by the
    same chapter (a notebook re-running its cell), never by another chapter."""
    if not isinstance(experiment, Experiment):
        raise TypeError(f"register takes an Experiment, got {type(experiment).__name__}")
    if not experiment.name or not all(ch.isalnum() or ch == "-" for ch in experiment.name):
        raise ValueError(f"an experiment name is letters, digits and '-', got {experiment.name!r}")
    known = EXPERIMENTS.get(experiment.name)
    if known is not None and known.chapter != experiment.chapter:
        raise ValueError(f"an experiment called {experiment.name!r} is already registered by chapter "
                         f"{known.chapter}")
    EXPERIMENTS[experiment.name] = experiment
    return experiment


def registered():
    """Every registered experiment: name -> Experiment. The chapters' experiments register
    themselves when looplm.experiments is imported (python -m looplm.results imports it)."""
    return dict(EXPERIMENTS)


def experiment(name):
    """The registered Experiment called `name`."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; registered: {', '.join(sorted(EXPERIMENTS)) or 'none'} "
                         f"(import looplm.experiments to register the book's)")
    return EXPERIMENTS[name]

# %% [markdown]
# ## The results file
#
# One JSON file per experiment, `book/results/<name>.json`:
#
# ```
# {"command": "python -m looplm.results run looped-vs-stacked --seeds 0 1 2",
#  "version": "0.1.0",
#  "seeds": [0, 1, 2],
#  "machine": {"python": ..., "torch": ..., "platform": ..., "cpu": ..., "threads": 1},
#  "results": {"0": {...}, "1": {...}, "2": {...}}}
# ```
#
# The folder is `book/results/` of the checkout the package is installed from, or the folder
# named by `LOOPLM_RESULTS`. The file is written atomically (a temporary file, then
# `os.replace`), with sorted keys, so that running the command twice on one machine leaves
# git clean. A value that is not a finite number, or not JSON at all, is refused before
# anything is written.

# %%
#| export
def results_dir():
    """Where results files live: $LOOPLM_RESULTS, else book/results/ of this checkout."""
    if os.environ.get("LOOPLM_RESULTS"):
        return Path(os.environ["LOOPLM_RESULTS"])
    return Path(looplm.__file__).resolve().parents[1] / "book" / "results"


def machine():
    """What a run's exact numbers depend on: Python, torch, the platform, the CPU, the threads."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpu": cpu, "threads": torch.get_num_threads()}


def _check_json(value, where):
    """Raise ValueError unless `value` is JSON made of finite numbers (the path names the culprit)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: keys must be strings, got {key!r}")
            _check_json(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
    elif isinstance(value, bool) or value is None or isinstance(value, str):
        return
    elif isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}: results must be finite numbers")
    else:
        raise ValueError(f"{where} is a {type(value).__name__}; results hold numbers, strings, lists, dicts")


def write_results(path, payload):
    """Write `payload` as JSON to `path`, atomically. -> path."""
    path = Path(path)
    _check_json(payload, path.stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True, allow_nan=False)
            f.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path

# %% [markdown]
# Running an experiment is a loop over its seeds, with one thread, followed by one write:

# %%
#| export
def run_experiment(name, seeds=None, out_dir=None):
    """Run experiment `name` for each seed (default its own) and store the results. -> the file."""
    exp = experiment(name)
    seeds = list(exp.seeds if seeds is None else seeds)
    if len(seeds) < 1 or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be non-negative ints, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must differ, got {seeds!r}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {}
        for seed in seeds:
            print(f"{name}: seed {seed} ...", file=sys.stderr, flush=True)
            result = exp.run(seed)
            if not isinstance(result, dict) or not isinstance(result.get("prefix"), list):
                raise ValueError(f"{name}: run(seed) must return a dict with a 'prefix' list of losses")
            results[str(seed)] = result
        payload = {"command": f"python -m looplm.results run {name} --seeds {' '.join(map(str, seeds))}",
                   "version": __version__, "seeds": seeds, "machine": machine(), "results": results}
    finally:
        torch.set_num_threads(threads)
    return write_results(Path(out_dir or results_dir()) / f"{name}.json", payload)


def load_results(name, folder=None):
    """The stored results of experiment `name` (the dict written by run_experiment)."""
    path = Path(folder or results_dir()) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no stored results for {name!r} at {path}: run "
                                f"`python -m looplm.results run {name}` to make them")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); run the command again") from e
    missing = [key for key in ("command", "version", "seeds", "machine", "results") if key not in payload]
    if missing:
        raise ValueError(f"{path} lacks {missing}: not a results file")
    return payload

# %% [markdown]
# ## Mean and spread
#
# Over three seeds, the mean and the range say more than a standard deviation computed from
# three numbers. `summary` gives both, and formats as `mean ± half-range`, which covers every
# seed:

# %%
#| export
@dataclass(frozen=True)
class Summary:
    """Mean, standard deviation (n - 1), lowest and highest of a few per-seed values."""

    mean: float
    std: float
    low: float
    high: float
    n: int
    values: tuple = field(default=(), repr=False)

    @property
    def spread(self):
        """Half the range: mean ± spread covers every seed."""
        return (self.high - self.low) / 2

    def __format__(self, spec):
        """f"{s:13.3f}": "mean ± spread", each with the precision, right-aligned to the width."""
        width, _, precision = (spec or ".3f").partition(".")
        text = f"{self.mean:.{precision or '3f'}} ± {self.spread:.{precision or '3f'}}"
        return text.rjust(int(width)) if width else text


def summary(values):
    """Summary of a list of numbers (one per seed)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summary needs at least one value")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Summary(statistics.fmean(values), std, min(values), max(values), len(values), tuple(values))


def per_seed(payload, *keys):
    """The value at results[seed][key1][key2]... for every seed, in the order of payload['seeds']."""
    out = []
    for seed in payload["seeds"]:
        value = payload["results"][str(seed)]
        for key in keys:
            value = value[key]
        out.append(value)
    return out

# %% [markdown]
# ## The live check
#
# A stored number can go stale: the code that produced it changes, and nobody re-runs the
# command. The check re-runs the first `prefix_steps` training steps of one seed and compares
# the losses with the stored `"prefix"`. On the machine that stored them (same Python, torch,
# platform and CPU model) they must be equal bit for bit. Elsewhere, another CPU may round a
# sum differently, and after twenty optimizer steps such differences stay far below
# `PREFIX_RTOL` $= 10^{-3}$; a change to the code moves the losses by far more.

# %%
#| export
def check_prefix(name, seed=None, folder=None):
    """Re-run the first steps of one stored seed. -> (max relative difference, same machine?).

    Raises AssertionError when the losses differ: at all on the storing machine, by more than
    PREFIX_RTOL elsewhere."""
    exp, payload = experiment(name), load_results(name, folder)
    seed = payload["seeds"][0] if seed is None else seed
    stored = payload["results"][str(seed)]["prefix"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        live = exp.prefix(seed, len(stored))
    finally:
        torch.set_num_threads(threads)
    if len(live) != len(stored):
        raise AssertionError(f"{name}: the live prefix has {len(live)} losses, the stored one {len(stored)}")
    here, there = machine(), dict(payload["machine"])
    same = all(here[k] == there.get(k) for k in ("python", "torch", "platform", "cpu")) and there.get("threads") == 1
    difference = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(live, stored))
    if (same and live != stored) or difference > PREFIX_RTOL:
        raise AssertionError(f"{name}, seed {seed}: the live losses differ from the stored ones by up to "
                             f"{difference:.2e} (relative){' on the machine that stored them' if same else ''}; "
                             f"if the code changed on purpose, run `{payload['command']}`")
    return difference, same

# %% [markdown]
# ## The command line
#
# `python -m looplm.results list` names the experiments, `run NAME [--seeds ...]` makes a
# results file, and `check NAME` runs the live check.

# %%
#| export
def main(argv=None):
    """python -m looplm.results {list,run,check}. Returns an exit status."""
    parser = argparse.ArgumentParser(prog="python -m looplm.results",
                                     description="Run the book's multi-seed experiments and check stored results.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the registered experiments")
    run = commands.add_parser("run", help="run an experiment for its seeds and store the results")
    run.add_argument("name")
    run.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the experiment's own (0 1 2)")
    run.add_argument("--out", default=None, help="folder for NAME.json (default book/results)")
    check = commands.add_parser("check", help="re-run the first steps of a stored seed")
    check.add_argument("name")
    check.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for name, exp in sorted(registered().items()):
                print(f"{name:24s} chapter {exp.chapter}  {exp.help}")
        elif args.command == "run":
            print(f"wrote {run_experiment(args.name, args.seeds, args.out)}")
        else:
            difference, same = check_prefix(args.name, args.seed)
            where = "the machine that stored them: identical" if same else f"another machine: within {difference:.1e}"
            print(f"{args.name}: the live prefix matches the stored one ({where})")
    except (ValueError, FileNotFoundError) as e:
        print(f"python -m looplm.results: error: {e}", file=sys.stderr)
        return 2
    except AssertionError as e:
        print(f"python -m looplm.results: mismatch: {e}", file=sys.stderr)
        return 1
    return 0


# %% [markdown]
# `python -m looplm.results` runs the package's `__main__.py`, this cell: it imports
# `looplm.experiments`, whose cells (in the chapters) register the book's experiments, and
# runs `main`.

# %%
#| export results.__main__
import looplm.experiments  # noqa: F401  (registers the chapters' experiments)
from looplm.results import main

if __name__ == "__main__" and "get_ipython" not in globals():
    raise SystemExit(main())

# %% [markdown]
# ## Tests
#
# The tests register a toy experiment (the "training" is a short deterministic sequence) and
# run the whole cycle in a temporary folder: write, load, summarise, check, refuse.

# %%
from looplm.testing import run_tests

# %% tags=["remove-cell", "nbval-check-output"]
#| test
import json
from pathlib import Path

import pytest

from looplm import __version__


def _toy_run(seed):
    losses = [1.0 / (step + 1 + seed) for step in range(30)]
    return {"prefix": losses[:5], "final": losses[-1]}


def _toy_prefix(seed, n_steps):
    return [1.0 / (step + 1 + seed) for step in range(n_steps)]


def _with_toy(name="toy-appendix"):
    EXPERIMENTS.pop(name, None)
    return register(Experiment(name, "B", "a toy", _toy_run, _toy_prefix, prefix_steps=5, seeds=(0, 1, 2)))


def test_results_round_trip(tmp_path=None):
    import tempfile as _tempfile
    folder = Path(tmp_path or _tempfile.mkdtemp())
    _with_toy()
    path = run_experiment("toy-appendix", out_dir=folder)
    payload = load_results("toy-appendix", folder)
    assert payload["seeds"] == [0, 1, 2] and payload["version"] == __version__
    assert payload["command"] == "python -m looplm.results run toy-appendix --seeds 0 1 2"
    assert set(payload["machine"]) == {"python", "torch", "platform", "cpu", "threads"}
    assert payload["machine"]["threads"] == 1
    s = summary(per_seed(payload, "final"))
    assert s.n == 3 and s.low == 1 / 32 and s.high == 1 / 30 and abs(s.mean - (1/30 + 1/31 + 1/32) / 3) < 1e-15
    assert f"{s:.4f}" == f"{s.mean:.4f} ± {s.spread:.4f}"
    assert f"{s:20.4f}" == f"{s.mean:.4f} ± {s.spread:.4f}".rjust(20) and f"{s}" == f"{s.mean:.3f} ± {s.spread:.3f}"
    before = path.read_bytes()
    run_experiment("toy-appendix", out_dir=folder)
    assert path.read_bytes() == before                      # deterministic: a re-run leaves git clean
    assert not list(folder.glob(".*.tmp"))                  # nothing half-written left behind
    assert check_prefix("toy-appendix", folder=folder) == (0.0, True)


def test_stale_results_are_caught(tmp_path=None):
    import tempfile as _tempfile
    folder = Path(tmp_path or _tempfile.mkdtemp())
    _with_toy()
    path = run_experiment("toy-appendix", out_dir=folder)
    payload = json.loads(path.read_text())
    payload["results"]["0"]["prefix"][3] *= 1 + 1e-9          # a tiny change on the storing machine
    path.write_text(json.dumps(payload))
    with pytest.raises(AssertionError, match="on the machine that stored them"):
        check_prefix("toy-appendix", folder=folder)
    payload["machine"]["cpu"] = "another CPU"                # elsewhere, 1e-9 is within the tolerance
    path.write_text(json.dumps(payload))
    assert check_prefix("toy-appendix", folder=folder)[1] is False
    payload["results"]["0"]["prefix"][3] *= 1.01             # but 1% is not
    path.write_text(json.dumps(payload))
    with pytest.raises(AssertionError, match="differ from the stored ones"):
        check_prefix("toy-appendix", folder=folder)


def test_results_errors(tmp_path=None):
    import tempfile as _tempfile
    folder = Path(tmp_path or _tempfile.mkdtemp())
    with pytest.raises(FileNotFoundError, match="run `python -m looplm.results run nothing-here`"):
        load_results("nothing-here", folder)
    with pytest.raises(ValueError, match=r"x.a\[1\] is nan: results must be finite"):
        write_results(folder / "x.json", {"a": [1.0, float("nan")]})
    assert not (folder / "x.json").exists()
    with pytest.raises(ValueError, match="unknown experiment 'no-such'"):
        experiment("no-such")
    _with_toy()
    with pytest.raises(ValueError, match="seeds must differ"):
        run_experiment("toy-appendix", seeds=[1, 1], out_dir=folder)
    with pytest.raises(ValueError, match="already registered by chapter B"):
        register(Experiment("toy-appendix", "C", "again", _toy_run, _toy_prefix))
    assert main(["run", "no-such", "--out", str(folder)]) == 2


run_tests(test_results_round_trip, test_stale_results_are_caught, test_results_errors)
_ = EXPERIMENTS.pop("toy-appendix", None)

# %% [markdown]
# ## The book's experiments
#
# The registered experiments, and for each the stored file's command, seeds and machine:

# %% tags=["nbval-check-output"]
import looplm.experiments  # noqa: F401  (registers the chapters' experiments in the package's registry)
import looplm.results

for name, exp in sorted(looplm.results.registered().items()):
    payload = load_results(name)
    print(f"{name:22s} chapter {exp.chapter}  {payload['command']}")
