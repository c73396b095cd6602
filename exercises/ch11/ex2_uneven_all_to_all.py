"""Exercise 11.2: The uneven all-to-all, from send and receive

Expert parallelism (section 11.5) sends each rank a different number of token rows: rank r sends
`send_counts[j]` rows to rank j. Before the rows can move, every rank must learn how many it will
receive from each other rank.

Write `exchange(rows, send_counts)`:

- rows: a float tensor [n, d] whose first send_counts[0] rows go to rank 0, the next
  send_counts[1] to rank 1, and so on (sum(send_counts) == n; a count may be 0).
- send_counts: a list of W ints.
- Return (received, recv_counts): recv_counts[j] is how many rows rank j sent here, and
  received [sum(recv_counts), d] holds them, rank 0's first, each rank's in the order it sent them
  (the rows a rank sends to itself included).
- Use only point-to-point calls (isend / irecv / send / recv): first exchange the counts, then the
  rows. No all_to_all, all_to_all_single or all_gather (the tests forbid them).

Grade it with `python -m looplm.grade ch11`.
"""

import torch
import torch.distributed as dist


def exchange(rows: torch.Tensor, send_counts: list):
    """-> (received rows, recv_counts) for an uneven all-to-all of `rows`."""
    raise NotImplementedError("Exercise 11.2: write exchange")
