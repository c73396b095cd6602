"""Exercise 11.1: Ring all-reduce from send and receive

An all-reduce over W ranks is a reduce-scatter followed by an all-gather, and the ring algorithm
does both with messages between neighbours only: split the tensor into W chunks; in W - 1 rounds
each rank sends one chunk to the next rank (rank + 1 mod W) and adds the chunk it receives from the
previous one, so that afterwards rank r holds the full sum of chunk (r + 1) mod W; in W - 1 more
rounds the finished chunks travel round the ring the same way, copied instead of added. Each rank
sends 2 (W - 1) / W of the tensor, whatever W is.

Write `ring_all_reduce(tensor)`:

- tensor: a float tensor, any shape, any number of elements (not necessarily a multiple of W).
- Sum it over the ranks of the default process group, in place, and return it.
- Use only torch.distributed point-to-point calls (dist.send / dist.recv, or isend / irecv):
  no dist.all_reduce, reduce_scatter or all_gather (the tests forbid them).
- Beware deadlock: if every rank first sends and then receives with blocking calls, gloo may wait
  forever; use isend for the send (and wait on it) while you recv.

Grade it with `python -m looplm.grade ch11`; the tests run it on 2 and 3 processes.
"""

import torch
import torch.distributed as dist


def ring_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place with a ring of send/recv; returns it."""
    raise NotImplementedError("Exercise 11.1: write ring_all_reduce")
