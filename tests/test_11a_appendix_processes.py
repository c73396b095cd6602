# Generated from book/11a_appendix_processes.py: edit the chapter, then run `make export`.

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from looplm.checkpoints import read_checkpoint
from looplm.distributed import (  # noqa: F401
    gather_routing,
    ExpertParallelLoopMoE,
    split_experts,
    DataParallel,
    run_train,
)
from looplm.train import main as train_main

# --- book/11a_appendix_processes.py:615 (cell 19) ---
SMALL = ["--task", "addition", "--difficulty", "3", "--batch-size", "12", "--d-model", "32", "--n-heads", "2",
         "--n-train", "500", "--n-test", "50", "--no-progress"]


def _single(flags, out):
    subprocess.run([sys.executable, "-m", "looplm.train", *flags, "--out", str(out)], check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})


def _losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _close(a, b, tolerance=1e-5):
    return len(a) == len(b) and max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= tolerance


def test_a_run_resumes_with_another_number_of_processes(tmp_path):
    half = SMALL + ["--steps", "4", "--eval-every", "4"]
    rest = SMALL + ["--steps", "8", "--eval-every", "4", "--resume"]
    _single(half, tmp_path / "one")
    ways = {"ddp": ("ddp", 1, 2), "fsdp": ("fsdp", 1, 2), "two machines": ("ddp", 2, 1)}
    for way in ways:
        shutil.copytree(tmp_path / "one", tmp_path / way)
    _single(rest, tmp_path / "one")                           # the one-process run, resumed
    for way, (kind, nnodes, nproc) in ways.items():           # the same, resumed by two processes
        launched = run_train(rest + ["--parallel", kind, "--out", tmp_path / way], nproc=nproc, nnodes=nnodes)
        assert _close(_losses(tmp_path / way), _losses(tmp_path / "one")), way
        if nnodes == 2:                                       # two agents met at one rendezvous
            assert launched.log.count("step      8/8") == 1
    experts = SMALL + ["--mlp", "moe", "--n-experts", "4", "--eval-every", "3"]
    _single(experts + ["--steps", "3"], tmp_path / "moe-one")
    run_train(experts + ["--steps", "3", "--parallel", "fsdp", "--expert-parallel", "--out", tmp_path / "moe"])
    one, two = (read_checkpoint(tmp_path / d / "checkpoint.pt")["trainer"] for d in ("moe-one", "moe"))
    assert one["model"].keys() == two["model"].keys()        # every rank's experts, gathered
    for name, tensor in one["model"].items():
        assert torch.allclose(two["model"][name], tensor, rtol=1e-5, atol=1e-6), name
    for i, moments in one["optimizer"]["state"].items():
        for key, tensor in moments.items():
            assert torch.allclose(two["optimizer"]["state"][i][key], tensor, rtol=1e-4, atol=1e-9), (i, key)
    _single(experts + ["--steps", "6", "--resume"], tmp_path / "moe-one")
    run_train(experts + ["--steps", "6", "--resume", "--parallel", "ddp", "--expert-parallel", "--out",
                         tmp_path / "moe"])                 # the experts sliced again
    assert _close(_losses(tmp_path / "moe"), _losses(tmp_path / "moe-one"))


def _workers(marker):
    """{LOCAL_RANK: pid} of the processes whose environment holds LOOPLM_TEST_RUN=marker."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LOOPLM_TEST_RUN={marker}".encode() in environ:
            ranks = [e for e in environ if e.startswith(b"LOCAL_RANK=")]
            if ranks:
                found[int(ranks[0].split(b"=")[1])] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc (Linux)")
def test_a_killed_worker_stops_the_run_and_leaves_the_last_checkpoint_whole(tmp_path):
    out, marker, failure = tmp_path / "run", uuid.uuid4().hex, []

    def run():
        try:
            run_train(SMALL + ["--steps", "2000", "--eval-every", "3", "--parallel", "ddp", "--out", out],
                      timeout=120, env={"LOOPLM_TEST_RUN": marker})
        except RuntimeError as e:
            failure.append(str(e))

    thread = threading.Thread(target=run)
    start = time.perf_counter()
    thread.start()
    while not (out / "checkpoint.pt").exists() and time.perf_counter() - start < 90:
        time.sleep(0.05)
    assert (out / "checkpoint.pt").exists()
    workers = _workers(marker)
    os.kill(workers[1], signal.SIGKILL)
    thread.join(timeout=110)
    assert not thread.is_alive() and failure, "the launch must fail, not hang"
    assert "killed by SIGKILL" in failure[0]
    assert time.perf_counter() - start < 120
    time.sleep(0.5)
    assert not _workers(marker), "no worker may outlive the launch"
    payload = read_checkpoint(out / "checkpoint.pt")                   # complete and readable
    step = payload["trainer"]["step"]
    assert step % 3 == 0 and step >= 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][:step] == list(range(1, step + 1))


def test_flags_that_cannot_work_stop_with_a_message(tmp_path, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    base = SMALL + ["--steps", "2", "--out", str(tmp_path / "run")]

    def error(flags, **env):
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            assert train_main(base + flags) == 2
        return capsys.readouterr().err

    assert "started by torchrun" in error(["--parallel", "ddp"])
    assert "add --mlp moe" in error(["--parallel", "ddp", "--expert-parallel"], RANK="0", WORLD_SIZE="2")
    assert "needs several processes" in error(["--mlp", "moe", "--expert-parallel"])
    assert "--parallel is none" in error([], RANK="0", WORLD_SIZE="2")
    batch = error(["--parallel", "ddp"], RANK="0", WORLD_SIZE="5")
    assert "--batch-size 12 is the global batch" in batch and "multiple of 5" in batch
    assert "multiple of 3" in error(["--parallel", "fsdp", "--mlp", "moe", "--n-experts", "4", "--expert-parallel"],
                                    RANK="0", WORLD_SIZE="3")
    assert "--norm-penalty" in error(["--parallel", "ddp", "--norm-penalty", "0.1"], RANK="0", WORLD_SIZE="2")
    assert not (tmp_path / "run").exists()                              # nothing was written
