from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 11.2 (an uneven all-to-all from point-to-point calls). They run it in
# 2 and 3 processes (gloo, CPU) and compare it with dist.all_to_all_single, which the exercise
# itself may not call.

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from looplm.distributed import launch  # noqa: E402


def one_process_first():
    """Run the exercise once in this process, in a process group of one: a function that is not
    written yet fails here at once, before any worker starts."""
    from looplm.distributed import free_port
    if dist.is_initialized():
        return ex.exchange(torch.ones(2, 3), [2])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        return ex.exchange(torch.ones(2, 3), [2])
    finally:
        dist.destroy_process_group()


def on_every_rank(width=3):
    """Runs in each worker: counts that differ by rank (zeros included) against all_to_all_single."""
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for case in range(3):
        send = [(rank + 2 * j + case) % 4 for j in range(world)]      # 0 .. 3 rows to each rank
        if case == 2:
            send = [0] * world
            send[0] = 5                                                 # everyone sends everything to rank 0
        g = torch.Generator().manual_seed(10 * case + rank)
        rows = torch.randn(sum(send), width, generator=g, dtype=torch.float64)
        counts = torch.empty(world, dtype=torch.long)
        dist.all_to_all_single(counts, torch.tensor(send))
        want = rows.new_empty(int(counts.sum()), width)
        dist.all_to_all_single(want, rows, counts.tolist(), send)
        saved = {n: getattr(dist, n) for n in ("all_to_all", "all_to_all_single", "all_gather", "all_gather_object")}
        for n in saved:
            setattr(dist, n, lambda *a, **k: (_ for _ in ()).throw(AssertionError("collectives are not allowed")))
        try:
            got, got_counts = ex.exchange(rows, send)
        finally:
            for n, f in saved.items():
                setattr(dist, n, f)
        results.append({"counts ok": list(got_counts) == counts.tolist(), "shape ok": tuple(got.shape) == tuple(want.shape),
                        "error": (got - want).abs().max().item() if want.numel() else 0.0})
    return results


@pytest.mark.parametrize("nproc", [2, 3])
def test_equals_all_to_all_single_with_uneven_and_empty_splits(nproc):
    one_process_first()
    for rank_results in launch("run_in_file", dict(path=__file__, function="on_every_rank"), nproc=nproc,
                               timeout=120).results:
        for r in rank_results:
            assert r["counts ok"] and r["shape ok"] and r["error"] == 0.0
