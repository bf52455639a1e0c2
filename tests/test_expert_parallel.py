"""Expert parallelism over 2 gloo ranks equals the single-process MoE layer."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from coordinator.central.parallel.distributed import DistributedError, free_port
from coordinator.central.parallel.expert_parallel import experts_per_rank, local_experts
from shared_model.moe import MoEFFN

DIM, HIDDEN, E, N = 16, 24, 4, 40


def _reference(seed: int):
    torch.manual_seed(seed)
    moe = MoEFFN(DIM, HIDDEN, E)
    x = torch.randn(2, N, DIM)  # one [1, N, DIM] slice per rank
    x.requires_grad_(True)
    out, stats = moe(x)
    (out.square().sum()).backward()
    return moe, x, out.detach(), stats, x.grad.detach()


def _worker(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist

    from coordinator.central.parallel.expert_parallel import ExpertParallelMoE

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        moe, x, out_ref, stats_ref, xgrad_ref = _reference(seed=7)
        ep = ExpertParallelMoE.from_moe(moe)
        for p in moe.parameters():
            p.grad = None
        xr = x.detach()[rank : rank + 1].clone().requires_grad_(True)
        out, stats = ep(xr)
        out.square().sum().backward()
        torch.testing.assert_close(out, out_ref[rank : rank + 1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stats["index"], stats_ref["index"].view(2, N)[rank])
        torch.testing.assert_close(xr.grad, xgrad_ref[rank : rank + 1], rtol=1e-5, atol=1e-6)
        # Every held expert's gradient is the sum over both ranks' tokens (= reference).
        torch.manual_seed(7)
        ref = MoEFFN(DIM, HIDDEN, E)
        xf = torch.randn(2, N, DIM)
        o, _ = ref(xf)
        o.square().sum().backward()
        assert sorted(map(int, ep.experts)) == local_experts(E, world, rank)
        for e in map(int, ep.experts):
            for w in ("w1", "w2", "w3"):
                got = getattr(ep.expert(e), w).weight.grad
                want = getattr(ref.expert(e), w).weight.grad
                if want is None:
                    assert got is None
                else:
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        results[rank] = "ok"
    except Exception as exc:  # reported to the parent, which fails the test
        results[rank] = repr(exc)
    finally:
        dist.destroy_process_group()


def test_expert_parallel_matches_single_process():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, free_port(), results), nprocs=2, join=True)
        assert dict(results) == {0: "ok", 1: "ok"}


def test_experts_per_rank_must_divide():
    assert experts_per_rank(8, 2) == 4
    assert local_experts(8, 2, 1) == [4, 5, 6, 7]
    with pytest.raises(DistributedError, match="divides moe.n_experts"):
        experts_per_rank(8, 3)
