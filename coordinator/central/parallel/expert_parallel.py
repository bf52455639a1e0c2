"""Expert parallelism: the experts of each MoE layer sharded over ranks.

Rank ``r`` of ``W`` holds experts ``r·k .. (r+1)·k - 1`` with ``k = experts_per_rank =
n_experts / W``. Every rank routes its own tokens (the router is replicated / FSDP-sharded
like any shared weight), sends each token to the rank owning its expert with
``all_to_all_single``, the owner runs its experts on everything it received, and a second
``all_to_all_single`` brings the outputs home. Both exchanges are autograd-aware, so the
backward pass sends gradients the same way back.

Parameter names are unchanged (``layers.{i}.ffn.experts.{e}.w1.weight`` with the *global*
expert id e), so a rank's state dict is the slice of the single-process one it owns.

Gradient scale: an expert's gradient on its owner is the *sum* over all ranks' tokens of
``d loss_r / d W``, while data parallelism averages over ranks; call
:func:`scale_expert_grads` with ``1 / W`` after ``backward()`` (the distributed trainer
does) so both kinds of parameters see the gradient of the global mean loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from coordinator.central.parallel.distributed import DistributedError, rank, world_size
from shared_model.moe import ModelError, MoEFFN


def experts_per_rank(n_experts: int, world: int) -> int:
    """Experts each rank holds; raises :class:`DistributedError` unless ``world`` divides E."""
    if world < 1 or n_experts % world:
        raise DistributedError(
            f"{n_experts} experts cannot be split evenly over {world} ranks: use a world "
            "size that divides moe.n_experts"
        )
    return n_experts // world


def local_experts(n_experts: int, world: int, r: int) -> list[int]:
    """Global ids of the experts held by rank ``r``."""
    k = experts_per_rank(n_experts, world)
    return list(range(r * k, (r + 1) * k))


def _exchange(t: Tensor, send: list[int], recv: list[int], differentiable: bool) -> Tensor:
    """all_to_all_single ``t`` (rows split by ``send``) into a ``sum(recv)``-row tensor."""
    out = t.new_empty((sum(recv), *t.shape[1:]))
    if differentiable:
        import torch.distributed.nn.functional as dnn

        return dnn.all_to_all_single(out, t.contiguous(), recv, send)
    dist.all_to_all_single(out, t.contiguous(), recv, send)
    return out


class ExpertParallelMoE(MoEFFN):
    """Drop-in :class:`~shared_model.moe.MoEFFN` whose experts are spread over the ranks.

    Given the same router and expert weights and the same tokens it returns the same
    outputs and router statistics as the single-process layer (token-level top-1 routing).
    Column mode (federated, document-level routing) is not expert-parallel.

    Args:
        dim, hidden, n_experts: layer sizes, as for :class:`MoEFFN`.
        group: process group (default: the world).
    """

    def __init__(self, dim: int, hidden: int, n_experts: int, group=None) -> None:
        self.world = world_size() if group is None else dist.get_world_size(group)
        self.rank = rank() if group is None else dist.get_rank(group)
        self.experts_per_rank = experts_per_rank(n_experts, self.world)
        super().__init__(dim, hidden, n_experts, local_experts(n_experts, self.world, self.rank))
        self.group = group

    @classmethod
    def from_moe(cls, moe: MoEFFN, group=None) -> ExpertParallelMoE:
        """Wrap ``moe``'s router and the experts this rank owns (modules shared, not copied).

        Raises:
            ModelError: ``moe`` lacks an expert this rank must hold.
        """
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.world = world_size() if group is None else dist.get_world_size(group)
        layer.rank = rank() if group is None else dist.get_rank(group)
        layer.experts_per_rank = experts_per_rank(moe.n_experts, layer.world)
        layer.n_experts, layer.group, layer.router = moe.n_experts, group, moe.router
        held = local_experts(moe.n_experts, layer.world, layer.rank)
        layer.experts = nn.ModuleDict({str(e): moe.expert(e) for e in held})
        return layer

    def _dispatch(self, flat: Tensor, index: Tensor) -> Tensor:
        # Sorting by expert also sorts by owner rank (experts are contiguous per rank).
        order = torch.argsort(index, stable=True)
        owner = index // self.experts_per_rank
        send = torch.bincount(owner, minlength=self.world)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_l, recv_l = send.tolist(), recv.tolist()
        sorted_idx = index.index_select(0, order)
        tokens = _exchange(flat.index_select(0, order), send_l, recv_l, differentiable=True)
        their_idx = _exchange(sorted_idx, send_l, recv_l, differentiable=False)
        out = self._local_experts(tokens, their_idx)
        back = _exchange(out, recv_l, send_l, differentiable=True)
        return back.new_zeros(flat.shape).index_copy(0, order, back)

    def _local_experts(self, tokens: Tensor, idx: Tensor) -> Tensor:
        """Run the held experts on received tokens (any order), output in the same order."""
        first = self.rank * self.experts_per_rank
        local = idx - first
        if tokens.shape[0] == 0:  # nothing routed here; the return exchange still runs
            return tokens.new_zeros(tokens.shape)
        order = torch.argsort(local, stable=True)
        counts = torch.bincount(local, minlength=self.experts_per_rank).tolist()
        pieces = tokens.index_select(0, order).split(counts)
        outs = [self.expert(first + j)(p) for j, p in enumerate(pieces) if p.shape[0]]
        cat = torch.cat(outs)
        return cat.new_zeros((tokens.shape[0], cat.shape[1])).index_copy(0, order, cat)

    def _by_column(self, x: Tensor, columns: Tensor) -> Tensor:
        raise ModelError(
            "column-mode routing is not expert-parallel: evaluate column mode on a "
            "single-process model that holds the needed columns"
        )


def apply_expert_parallel(model: nn.Module, group=None) -> nn.Module:
    """Replace every :class:`MoEFFN` of ``model`` by an :class:`ExpertParallelMoE` in place.

    Experts this rank does not own are dropped (freed); names of the kept ones are
    unchanged. Returns ``model``.
    """
    for block in getattr(model, "layers", []):
        ffn = getattr(block, "ffn", None)
        if isinstance(ffn, MoEFFN) and not isinstance(ffn, ExpertParallelMoE):
            block.ffn = ExpertParallelMoE.from_moe(ffn, group)
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Expert weights held by this rank (those of :class:`ExpertParallelMoE` layers)."""
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, ExpertParallelMoE):
            params.extend(module.experts.parameters())
    return params


@torch.no_grad()
def scale_expert_grads(model: nn.Module, factor: float) -> None:
    """Multiply the gradients of this rank's expert weights by ``factor`` (see module doc)."""
    for p in expert_parameters(model):
        if p.grad is not None:
            p.grad.mul_(factor)
