"""``global_weighted_mean`` and ``global_whiten``: one process by hand, two by a gloo group.

On one process they are the ordinary weighted mean and :func:`whiten`. On two (spawned here with
``torch.multiprocessing`` and a gloo process group, no Lightning), each rank holds half of the
rows; averaging the ranks' ``global_weighted_mean`` shares (what DDP does to gradients) must give
the mean over all rows, and ``global_whiten`` must give each rank exactly its rows of
``whiten(all rows)`` — whereas per-rank ``whiten`` would not.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prefl.functional import global_weighted_mean, global_whiten, whiten

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [2.0, 2.0, 0.0], [9.0, 1.0, 5.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
ROWS = torch.tensor([0.5, 1.5, -1.0, 3.0])
WEIGHTS = torch.tensor([1.0, 1.0, 0.0, 1.0])


def test_global_weighted_mean_on_one_process():
    # (0.5 + 1.5 + 3.0) / 3 = 5/3; the weight-0 row (-1.0) does not count
    assert global_weighted_mean(ROWS, WEIGHTS).item() == pytest.approx(5 / 3, abs=1e-7)
    assert global_weighted_mean(ROWS).item() == pytest.approx(4 / 4, abs=1e-7)


def test_global_whiten_on_one_process_equals_whiten():
    # valid: 1 2 3 4 2 2 9 1 5 -> mean 29/9, biased var = (sum sq 145)/9 - (29/9)^2
    mean, var = 29 / 9, 145 / 9 - (29 / 9) ** 2
    out = global_whiten(VALUES, MASK)
    expected = (VALUES - mean) / (var + 1e-8) ** 0.5 * MASK
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, whiten(VALUES, MASK), atol=1e-6, rtol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rows = slice(2 * rank, 2 * rank + 2)
        out[rank] = {
            "share": global_weighted_mean(ROWS[rows], WEIGHTS[rows]).item(),
            "whitened": global_whiten(VALUES[rows], MASK[rows]),
            "local": whiten(VALUES[rows], MASK[rows]),
        }
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
        return dict(out)


def test_ranks_shares_average_to_the_global_mean(two_ranks):
    # rank 0: rows 0.5, 1.5 (weights 1, 1); rank 1: -1.0, 3.0 (weights 0, 1); total weight 3
    # shares: (0.5 + 1.5) * 2 / 3 = 4/3 and 3.0 * 2 / 3 = 2; their mean 5/3 = the global mean
    assert two_ranks[0]["share"] == pytest.approx(4 / 3, abs=1e-6)
    assert two_ranks[1]["share"] == pytest.approx(2.0, abs=1e-6)


def test_global_whiten_over_two_ranks_is_whiten_over_all_rows(two_ranks):
    full = whiten(VALUES, MASK)
    together = torch.cat([two_ranks[0]["whitened"], two_ranks[1]["whitened"]])
    torch.testing.assert_close(together, full, atol=1e-6, rtol=0)
    local = torch.cat([two_ranks[0]["local"], two_ranks[1]["local"]])
    assert (local - full).abs().max() > 0.1  # per-rank statistics differ
