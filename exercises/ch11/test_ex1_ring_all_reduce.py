from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 11.1 (ring all-reduce). They run the function in 2 and 3 processes
# (gloo, CPU) and compare it with dist.all_reduce, which the exercise itself may not call.

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from looplm.distributed import launch  # noqa: E402


def one_process_first():
    """Run the exercise once in this process, in a process group of one: a function that is not
    written yet fails here at once, before any worker starts."""
    from looplm.distributed import free_port
    if dist.is_initialized():
        return ex.ring_all_reduce(torch.ones(3))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        return ex.ring_all_reduce(torch.ones(3))
    finally:
        dist.destroy_process_group()


def on_every_rank(shapes):
    """Runs in each worker: the exercise on tensors of `shapes`, with the collectives forbidden."""
    rank = dist.get_rank()
    forbidden = ("all_reduce", "reduce_scatter", "reduce_scatter_tensor", "all_gather", "all_gather_into_tensor")
    saved = {name: getattr(dist, name) for name in forbidden}
    results = []
    for i, shape in enumerate(shapes):
        g = torch.Generator().manual_seed(100 * i + rank)
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        want = x.clone()
        saved["all_reduce"](want)
        for name in forbidden:
            setattr(dist, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("collectives are not allowed")))
        try:
            got = ex.ring_all_reduce(x)
        finally:
            for name, f in saved.items():
                setattr(dist, name, f)
        results.append({"same object": got is x, "error": (x - want).abs().max().item()})
    return results


def _run(nproc, shapes):
    return launch("run_in_file", dict(path=__file__, function="on_every_rank", kwargs=dict(shapes=shapes)),
                  nproc=nproc, timeout=120).results


@pytest.mark.parametrize("nproc", [2, 3])
def test_equals_dist_all_reduce_on_sizes_that_do_not_split_evenly(nproc):
    one_process_first()
    for rank_results in _run(nproc, [[7], [2, 3], [1], [64]]):
        for r in rank_results:
            assert r["same object"] and r["error"] <= 1e-12
