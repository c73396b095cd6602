# Generated from book/11_many_processes.py: edit the chapter, then run `make export`.

import time

import pytest
import torch

from looplm.distributed import (  # noqa: F401
    TASKS,
    task,
    free_port,
    Launch,
    launch,
    main,
    collectives,
    TokenObjective,
    global_batch,
    allreduce_gradients,
    BucketedAllReduce,
    fsdp_shard,
    data_parallel_equals_one_process,
    counting_collectives,
    fsdp_collectives,
    step_collectives,
    step_traffic,
    expert_parallel_traffic,
    EXPERT_WEIGHTS,
    AllToAll,
    ExpertParallelMoE,
    reduce_replicated_grads,
    gather_experts,
    full_expert_grads,
    shard_experts_state,
    expert_parallel_equals_local,
    SHARDED_FORMAT,
    INFO_NAME,
    METADATA_NAME,
    OPTIMIZER_KEY,
    read_info,
    save_sharded,
    load_sharded,
    to_single_process,
    from_single_process,
    checkpoint_round_trip,
    data_parallel_cases,
    ddp_reduced_values,
    run_in_file,
    fails_on_rank,
    sleeps,
)
from looplm.distributed import _owned
from looplm.model import LoopLM, LoopLMConfig

# --- book/11_many_processes.py:1712 (cell 42) ---
BASE = dict(vocab_size=23, d_model=16, n_heads=2, n_loops=4, injection="add", init_state="zeros", max_seq_len=16)


def test_collectives_give_their_defining_values():
    got = launch("collectives").results
    x = [[0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0]]
    summed = [a + b for a, b in zip(*x)]
    for rank in (0, 1):
        assert got[rank]["all-reduce"] == summed
        assert got[rank]["all-gather"] == x[0] + x[1]
        assert got[rank]["reduce-scatter"] == summed[2 * rank:2 * rank + 2]
        assert got[rank]["all-to-all"] == x[0][2 * rank:2 * rank + 2] + x[1][2 * rank:2 * rank + 2]


def test_every_way_of_data_parallelism_equals_one_process():
    ways = ["by hand", "bucketed", "ddp", "fsdp"]
    cases = [dict(config=BASE, ways=ways + ["ddp, accumulating"], forward=dict(checkpoint=True)),
             dict(config={**BASE, "exit_gate": True}, ways=ways, objective="stage1"),
             dict(config={**BASE, "mlp": "moe", "n_experts": 4, "top_k": 2, "balance": "none"}, ways=ways,
                  objective="every step"),
             dict(config=BASE, ways=["ddp", "fsdp"], dtype="float32"),
             dict(config=BASE, ways=["ddp, model wrapped"], steps=2)]
    reports = launch("data_parallel_cases", dict(cases=cases), timeout=300).results
    for rank_reports in reports:
        for case, report in zip(cases, rank_reports):
            tolerance = 1e-5 if case.get("dtype") == "float32" else 1e-10
            for way, found in report.items():
                if way == "ddp, model wrapped":        # DDP cannot see a LoopOutput: silently wrong
                    assert found["parameters"] > 1e-3
                    continue
                assert found["loss"] <= tolerance and found["parameters"] <= tolerance, (case, way, found)
                if way == "bucketed":
                    assert found["reductions per parameter per step"] == 1.0


def test_each_gradient_is_reduced_once_per_step_whatever_the_loop_depth():
    for rows in launch("ddp_reduced_values", dict(config=BASE)).results:
        assert [r["S"] for r in rows] == [1, 4]
        for row in rows:
            assert row["reduced values"] == row["parameter values"]


def test_fsdp_issues_the_collectives_the_model_predicts():
    config = dict(vocab_size=23, d_model=16, n_heads=2, injection="add", init_state="zeros", max_seq_len=16)
    way_of = {True: "fsdp resharded", False: "fsdp kept", None: "fsdp root"}
    for rows in launch("fsdp_collectives", dict(config=config)).results:
        for row in rows:
            modelled = step_collectives(row["all parameters"], row["core parameters"], row["S"], way_of[row["reshard"]])
            kinds = [kind for kind, _ in modelled]
            assert row["counts"]["all-gather"][0] == kinds.count("all-gather")
            assert row["counts"]["reduce-scatter"][0] == kinds.count("reduce-scatter")
            put_in = sum(4 * v / 2 if kind == "all-gather" else 4 * v for kind, v in modelled)
            assert put_in <= row["counts"]["all-gather"][1] + row["counts"]["reduce-scatter"][1] <= put_in + 4 * 64


def test_expert_parallelism_equals_the_local_layer():
    cases = [dict(router="softmax", top_k=2), dict(router="sigmoid", top_k=1), dict(router="softmax", top_k=2, n_shared=1),
             dict(router="sigmoid", top_k=2)]
    for rows in launch("expert_parallel_equals_local", dict(cases=cases, loops=3)).results:
        for row in rows:
            for key in ("output", "input grad", "expert grads", "router grad"):
                assert row[key] <= 1e-12, (row["case"], key, row[key])
            assert row["calls, one call"] == {"counts": 1, "dispatch": 1, "combine": 1, "combine_backward": 1,
                                              "dispatch_backward": 1}
            assert all(v == 3 for v in row["calls, looped"].values())
    with pytest.raises(ValueError, match="n_experts=3 must be divisible by the world size 2"):
        _owned(3, 0, 2)


def test_a_failing_or_hanging_worker_fails_the_launch_with_its_log():
    with pytest.raises(RuntimeError, match="rank 1 stops here on purpose"):
        launch("fails_on_rank", dict(rank=1), timeout=120)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="did not finish within 20 s"):
        launch("sleeps", dict(seconds=600), timeout=20)
    assert time.perf_counter() - start < 60


def test_the_traffic_model_by_hand_and_bad_input():
    # W = 4, P = 100 values of 2 bytes, 40 in the core, S = 3
    assert step_traffic(100, 40, 4, 3, "ddp", 2) == 2 * 0.75 * 100 * 2
    assert step_traffic(100, 40, 4, 3, "fsdp resharded", 2) == 0.75 * 2 * (60 + 6 * 40 + 100)
    assert step_traffic(100, 40, 4, 3, "fsdp kept", 2) == 0.75 * 2 * (60 + 3 * 40 + 100)
    assert step_traffic(100, 40, 4, 3, "fsdp root", 2) == 0.75 * 2 * 200
    assert expert_parallel_traffic(10, 2, 8, 4, 3, 1, 2) == 4 * 3 * 0.75 * 2 * 10 * 8 * 2
    with pytest.raises(ValueError, match="way must be"):
        step_traffic(100, 40, 4, 3, "zero")
    with pytest.raises(ValueError, match="no task"):
        launch("nonexistent")
    with pytest.raises(ValueError, match="objective must be"):
        TokenObjective(LoopLM(LoopLMConfig(**BASE)), "first")



def test_a_checkpoint_saved_on_two_ranks_resumes_on_one_and_on_two(tmp_path):
    from looplm.checkpoints import load_model
    config = dict(vocab_size=23, d_model=16, n_heads=2, n_loops=3, injection="add", init_state="zeros", n_coda=1,
                  max_seq_len=16)
    args = dict(directory=str(tmp_path), config=config)
    trained = launch("checkpoint_round_trip", dict(phase="train", save="two", **args)).results[0]
    one = launch("checkpoint_round_trip", dict(phase="resume", load="two", save="one", **args), nproc=1).results[0]
    again = launch("checkpoint_round_trip", dict(phase="resume", load="one", **args)).results
    assert read_info(tmp_path / "two")["step"] == 2 and one["step"] == 2
    for loaded in (one, *again):
        assert loaded["weights"] == trained["weights"]                 # bit-identical, through JSON's exact floats
    assert all(r["losses"] == trained["losses"] for r in again)         # the optimizer state came back too
    assert max(abs(a - b) for a, b in zip(one["losses"], trained["losses"])) <= 1e-12
    to_single_process(tmp_path / "two", tmp_path / "single.pt")
    model = load_model(tmp_path / "single.pt", LoopLM(LoopLMConfig(**config)).double())
    assert model.lm_head.weight is model.embed.weight
    for name, p in model.named_parameters():
        assert p.detach().flatten().tolist() == trained["weights"][name]
    from_single_process(tmp_path / "single.pt", tmp_path / "back")
    back = launch("checkpoint_round_trip", dict(phase="resume", load="back", **args)).results[0]
    assert back["weights"] == trained["weights"] and back["losses"] == trained["losses"]
    with pytest.raises(FileNotFoundError):
        read_info(tmp_path / "missing")
