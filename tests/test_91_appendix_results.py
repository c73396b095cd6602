# Generated from book/91_appendix_results.py: edit the chapter, then run `make export`.

import json
from pathlib import Path

import pytest

from looplm import __version__
from looplm.results import (  # noqa: F401
    EXPERIMENTS,
    PREFIX_RTOL,
    Experiment,
    register,
    registered,
    experiment,
    results_dir,
    machine,
    write_results,
    run_experiment,
    load_results,
    Summary,
    summary,
    per_seed,
    check_prefix,
    main,
)

# --- book/91_appendix_results.py:391 (cell 18) ---
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


_ = EXPERIMENTS.pop("toy-appendix", None)
