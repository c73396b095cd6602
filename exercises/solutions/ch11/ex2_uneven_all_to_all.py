"""Exercise 11.2: The uneven all-to-all, from send and receive (reference solution)."""

import torch
import torch.distributed as dist


def exchange(rows: torch.Tensor, send_counts: list):
    """-> (received rows, recv_counts) for an uneven all-to-all of `rows`."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if len(send_counts) != world or sum(send_counts) != rows.shape[0]:
        raise ValueError("send_counts must have one entry per rank and sum to the number of rows")
    counts = torch.tensor(send_counts, dtype=torch.long)
    recv_counts = [0] * world
    recv_counts[rank] = send_counts[rank]
    requests = [dist.isend(counts[j:j + 1].clone(), j) for j in range(world) if j != rank]
    for j in range(world):
        if j != rank:
            got = torch.empty(1, dtype=torch.long)
            dist.recv(got, j)
            recv_counts[j] = int(got)
    for request in requests:
        request.wait()
    starts = [sum(send_counts[:j]) for j in range(world)]
    pieces = [None] * world
    pieces[rank] = rows[starts[rank]:starts[rank] + send_counts[rank]].clone()
    requests = [dist.isend(rows[starts[j]:starts[j] + send_counts[j]].contiguous(), j)
                for j in range(world) if j != rank and send_counts[j]]
    for j in range(world):
        if j != rank:
            pieces[j] = rows.new_empty((recv_counts[j], rows.shape[1]))
            if recv_counts[j]:
                dist.recv(pieces[j], j)
    for request in requests:
        request.wait()
    return torch.cat(pieces), recv_counts
