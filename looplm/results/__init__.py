# Generated from book/91_appendix_results.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['EXPERIMENTS', 'PREFIX_RTOL', 'Experiment', 'register', 'registered', 'experiment', 'results_dir', 'machine', 'write_results', 'run_experiment', 'load_results', 'Summary', 'summary', 'per_seed', 'check_prefix', 'main']
# fmt: on

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

# --- book/91_appendix_results.py:71 (cell 3) ---
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

# --- book/91_appendix_results.py:137 (cell 5) ---
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

# --- book/91_appendix_results.py:198 (cell 7) ---
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

# --- book/91_appendix_results.py:247 (cell 9) ---
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

# --- book/91_appendix_results.py:301 (cell 11) ---
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

# --- book/91_appendix_results.py:334 (cell 13) ---
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
