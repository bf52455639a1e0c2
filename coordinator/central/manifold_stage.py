"""Stage 5 runner: ``run_manifold(cfg, checkpoint, out_dir, ...) -> result dict``.

Steps: expert L1 distances per PDR layer → SMACOF MDS → torus positions; manifold routers
initialised by ridge regression to reproduce the old router's choices; routers and
positions trained (experts and every other weight frozen) on task CE + delta + balance +
smooth + fold; ``stage5.safetensors``, ``.trd`` neighbour deltas and ``stage5.json``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from coordinator.central import manifold as mf
from coordinator.central.checkpoint import (
    check_corpus_tokenizer,
    load_checkpoint,
    save_checkpoint,
)
from coordinator.central.trainer import EVAL_SEED, evaluate
from coordinator.central.trd import write_trd_set
from shared_model.config import PerspectiveConfig
from shared_model.data import prepare_corpus
from shared_model.files import write_json_atomic
from shared_model.model import PerspectiveModel


@dataclass(frozen=True)
class ManifoldParams:
    """Stage-5 settings (defaults documented in docs/stages.md §5)."""

    steps: int = 100
    lr: float = 1e-2
    margin: float = 0.1
    temperature_factor: float = 0.5
    w_delta: float = 0.1
    w_balance: float = 1.0
    w_smooth: float = 0.1
    w_fold: float = 1.0
    neighbours: int = 3
    init_batches: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.init_batches < 1 or self.neighbours < 1:
            raise mf.ManifoldError("steps >= 0, init_batches >= 1 and neighbours >= 1 are required")
        for name in ("w_delta", "w_balance", "w_smooth", "w_fold", "temperature_factor", "lr"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise mf.ManifoldError(f"{name} = {getattr(self, name)!r}: allowed finite >= 0")


def layout_experts(model: PerspectiveModel, margin: float, seed: int = 0) -> dict[str, Any]:
    """Distances, MDS positions on the torus and stress per PDR layer and per column."""
    dists, positions, stresses = {}, {}, {}
    for i in model.cfg.model.pdr_layers():
        dist = mf.l1_distances(mf.expert_matrix(model.layers[i].ffn))
        x, s = mf.smacof(dist.double().numpy(), seed=seed)
        dists[i] = dist
        positions[i] = torch.from_numpy(mf.to_torus(x, margin)).float()
        stresses[i] = s
    column = torch.stack(list(dists.values())).mean(0)
    xc, sc = mf.smacof(column.double().numpy(), seed=seed)
    return {
        "dist": dists,
        "positions": positions,
        "stress": stresses,
        "column_dist": column,
        "column_positions": torch.from_numpy(mf.to_torus(xc, margin)).float(),
        "column_stress": sc,
    }


@torch.no_grad()
def collect_router_inputs(model, dataset, batches, batch_size, seq_len) -> dict[int, Tensor]:
    """Inputs ``[N, d]`` of every MoE FFN over ``batches`` fixed validation batches."""
    store: dict[int, list[Tensor]] = {i: [] for i in model.cfg.model.pdr_layers()}
    hooks = [
        model.layers[i].ffn.register_forward_pre_hook(
            lambda mod, args, i=i: store[i].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for i in store
    ]
    try:
        for b in range(batches):
            batch = dataset.batch(b, batch_size, seq_len, seed=EVAL_SEED)
            model(batch[:, :-1].to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(v).float() for i, v in store.items()}


@torch.no_grad()
def fit_router(router: mf.ManifoldRouter, h: Tensor, index: Tensor, ridge: float = 1e-3) -> None:
    """Ridge-regress ``logit(position of the old choice)`` on ``h`` into ``router.proj``.

    Starts stage 5 close to the old router's assignment, so alignment refines routing
    instead of re-learning it.
    """
    target = router.positions[index].clamp(0.02, 0.98)
    y = torch.log(target / (1 - target))
    x = torch.cat([h, torch.ones(h.shape[0], 1, device=h.device)], 1).double()
    a = x.T @ x + ridge * x.shape[0] * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    w = torch.linalg.solve(a, x.T @ y.double()).float()
    router.proj.weight.copy_(w[:-1].T)
    router.proj.bias.copy_(w[-1])


def _loads(model, inputs: dict[int, Tensor], manifold: bool) -> dict[int, dict[str, float]]:
    out = {}
    with torch.no_grad():
        for i, h in inputs.items():
            ffn = model.layers[i].ffn
            idx = ffn.router.assign(h)[0] if manifold else ffn.router(h).argmax(-1)
            out[i] = mf.load_stats(idx, ffn.n_experts)
    return out


def _stage_losses(model, batch, geometry, p: ManifoldParams) -> tuple[Tensor, dict[str, float]]:
    out = model(batch[:, :-1], targets=batch[:, 1:])
    parts = {"ce": out.loss}
    delta = bal = smooth = fold = out.loss.new_zeros(())
    layers = mf.manifold_layers(model)
    for li, i in enumerate(layers):
        ffn = model.layers[i].ffn
        pos = ffn.router.positions
        g = geometry[i]
        delta = delta + mf.delta_loss(pos, g["dist"], g["sigma2"])
        bal = bal + mf.balance_var_loss(out.aux["router_probs"][li])
        smooth = smooth + mf.smooth_loss(ffn.last_points)
        fold = fold + mf.fold_loss(pos, g["tets"], g["vol0"])
    n = max(len(layers), 1)
    parts.update(delta=delta / n, balance=bal / n, smooth=smooth / n, fold=fold / n)
    loss = (
        out.loss
        + p.w_delta * parts["delta"]
        + p.w_balance * parts["balance"]
        + p.w_smooth * parts["smooth"]
        + p.w_fold * parts["fold"]
    )
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def run_manifold(
    cfg: PerspectiveConfig,
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    data=None,
    device: str | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Stage 5: align routers and experts on the torus; write checkpoint, ``.trd`` and JSON.

    Args:
        cfg: config (its model section must match the checkpoint's).
        checkpoint: a stage-3 or stage-4 MoE checkpoint.
        out_dir: output directory.
        data: prepared corpus (default: stdlib at ``cfg.model.vocab_size``).
        device: torch device (default CPU).
        **params: fields of :class:`ManifoldParams`.

    Returns:
        JSON-ready result: positions, stress, losses, loads before/after, val loss
        before/after, checkpoint path and sha256, ``.trd`` summary.
    """
    p = ManifoldParams(**params)
    dev = torch.device(device or "cpu")
    model, data = _load_moe_model(cfg, checkpoint, data, dev)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to fit
    torch.manual_seed(p.seed)
    train_ds, val_ds = data.dataset("train"), data.dataset("val")
    t = cfg.train
    t0 = time.perf_counter()
    val_before = evaluate(model, val_ds, t.eval_batches, t.batch_size, t.seq_len)
    inputs = collect_router_inputs(model, val_ds, p.init_batches, t.batch_size, t.seq_len)
    loads_before = _loads(model, inputs, manifold=False)
    layout, temps, geometry = _install_manifold_routers(model, inputs, p, dev)
    loads_init = _loads(model, inputs, manifold=True)
    history = _train_routers(model, train_ds, geometry, p, dev)
    model.eval()
    loads_after = _loads(model, inputs, manifold=True)
    val_after = evaluate(model, val_ds, t.eval_batches, t.batch_size, t.seq_len)
    final_pos = {
        i: model.layers[i].ffn.router.positions.detach().cpu() % 1.0 for i in layout["positions"]
    }
    written = _write_stage5(model, cfg, final_pos, out_dir, p, data.tokenizer_sha256)
    result = {
        "stage": 5,
        "params": asdict(p),
        **written,
        "val_loss_before": val_before,
        "val_loss_after": val_after,
        "stress": {str(i): s for i, s in layout["stress"].items()},
        "column_stress": layout["column_stress"],
        "column_positions": layout["column_positions"].tolist(),
        "positions": {str(i): v.tolist() for i, v in final_pos.items()},
        "temperature": {str(i): v for i, v in temps.items()},
        "loads_before": {str(i): v for i, v in loads_before.items()},
        "loads_init": {str(i): v for i, v in loads_init.items()},
        "loads_after": {str(i): v for i, v in loads_after.items()},
        "history": history,
        "elapsed_s": time.perf_counter() - t0,
    }
    write_json_atomic(out_dir / "stage5.json", result, default=_jsonable)
    return result


def _load_moe_model(cfg: PerspectiveConfig, checkpoint, data, dev) -> tuple[PerspectiveModel, Any]:
    """The stage-3/4 checkpoint's model on ``dev`` in eval mode, and the corpus (default
    stdlib), its tokenizer checked against the checkpoint's."""
    ckpt = load_checkpoint(checkpoint)
    if ckpt.stage not in (3, 4):
        raise mf.ManifoldError(
            f"stage 5 needs a stage-3 or stage-4 checkpoint, got stage {ckpt.stage}"
        )
    if ckpt.cfg.model != cfg.model or ckpt.cfg.moe.n_experts != cfg.moe.n_experts:
        raise mf.ManifoldError("checkpoint model config differs from the config given")
    if data is None:
        data = prepare_corpus("stdlib", cfg.model.vocab_size)
    check_corpus_tokenizer(ckpt, data, checkpoint=checkpoint)
    model = PerspectiveModel(cfg, moe=True)
    model.load_state_dict(ckpt.model_state)
    return model.to(dev).eval(), data


def _install_manifold_routers(model, inputs: dict[int, Tensor], p: ManifoldParams, dev):
    """Lay the experts out on the torus and replace each PDR layer's router by a manifold
    router fitted to the old one's choices on ``inputs``. Returns ``(layout, temperatures,
    geometry)``: the geometry is what the stage's smooth and fold losses keep."""
    old_index = {i: model.layers[i].ffn.router(h).argmax(-1) for i, h in inputs.items()}
    layout = layout_experts(model, p.margin, p.seed)
    temps = {
        i: mf.default_temperature(pos, p.temperature_factor)
        for i, pos in layout["positions"].items()
    }
    mf.install_manifold_routers(model, layout["positions"], temps)
    geometry = {}
    for i, pos in layout["positions"].items():
        router = model.layers[i].ffn.router.to(dev)
        fit_router(router, inputs[i], old_index[i])
        tets = mf.tetrahedra(pos)
        geometry[i] = {
            "dist": layout["dist"][i].to(dev),
            "sigma2": 2.0 * temps[i] / max(p.temperature_factor, 1e-6),
            "tets": tets.to(dev),
            "vol0": mf.signed_volumes(pos, tets).to(dev),
        }
    return layout, temps, geometry


def _write_stage5(model, cfg, positions, out_dir: Path, p: ManifoldParams, tokenizer_sha256):
    """``stage5.safetensors`` and the ``.trd`` neighbour deltas; their part of the result."""
    ckpt_path = out_dir / "stage5.safetensors"
    sha = save_checkpoint(
        ckpt_path,
        model,
        cfg,
        stage=5,
        step=p.steps,
        extra={"manifold": asdict(p)},
        tokenizer_sha256=tokenizer_sha256,
    )
    index = write_trd_set(
        model, positions, out_dir / "trd", p.neighbours, cfg.ternary.threshold_factor
    )
    return {
        "checkpoint": str(ckpt_path),
        "checkpoint_sha256": sha,
        "trd": {
            "dir": str(out_dir / "trd"),
            "files": len(index["files"]),
            "mean_bits_per_param": index["mean_bits_per_param"],
        },
    }


def _train_routers(model, dataset, geometry, p: ManifoldParams, dev) -> list[dict[str, float]]:
    model.requires_grad_(False)
    params = []
    for i in mf.manifold_layers(model):
        router = model.layers[i].ffn.router
        router.requires_grad_(True)
        params += [router.proj.weight, router.proj.bias, router.positions]
    opt = torch.optim.AdamW(params, lr=p.lr, weight_decay=0.0)
    t = model.cfg.train
    history = []
    model.train()
    for step in range(p.steps):
        batch = dataset.batch(step, t.batch_size, t.seq_len, seed=t.seed + 5).to(dev)
        loss, parts = _stage_losses(model, batch, geometry, p)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % max(1, p.steps // 10) == 0 or step == p.steps - 1:
            history.append({"step": step + 1, "loss": float(loss.detach()), **parts})
    return history


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Tensor):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")
