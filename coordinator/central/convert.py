"""Path 9.1: convert a Mixtral-style checkpoint into a ternary Perspective MoE.

``run_convert(source, out_dir, ...)`` performs, each step followed by a short KD fine-tune
against the original model and a perplexity measurement relative to it:

1. **map + PDR**: embeddings, norms, routers and experts copied; attention kept in the
   layers with ``(i + 1) % gqa_every == 0`` and replaced by PDR elsewhere, each PDR
   initialised by regressing its output onto the replaced attention's output on sample
   activations; each kept-attention layer's dense FFN starts as its most-used expert and is
   regressed onto the MoE block's output;
2. **grow**: experts doubled (perturbed clones) until ``n_experts``;
3. **ternary**: progressive ternarisation along ``cfg.ternary.schedule`` (STE).

The result is a stage-4-format checkpoint (``converted.safetensors``) and ``convert.json``.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from coordinator.central.checkpoint import save_checkpoint
from coordinator.central.convert_map import (
    config_from_mixtral,
    grow_experts,
    map_weights,
    moe_block,
    with_experts,
)
from coordinator.central.convert_params import ConvertError, ConvertParams
from coordinator.central.trainer import EVAL_SEED
from shared_model.files import write_json_atomic
from shared_model.losses import kd_loss
from shared_model.model import PerspectiveModel


def load_mixtral(source: str | Path):
    """``MixtralForCausalLM`` (float32, eval) from a local Hugging Face directory.

    Raises:
        ConvertError: transformers missing or the directory holds no Mixtral checkpoint.
    """
    try:
        from transformers import MixtralForCausalLM
    except ImportError as exc:
        raise ConvertError(
            "conversion needs transformers: pip install 'perspective[convert]'"
        ) from exc
    if not Path(source).is_dir():
        raise ConvertError(f"{source} is not a directory with a Hugging Face Mixtral checkpoint")
    try:
        model = MixtralForCausalLM.from_pretrained(str(source), torch_dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ConvertError(f"cannot load a Mixtral checkpoint from {source}: {exc}") from exc
    return model.eval()


def _teacher_logits(teacher, x):
    with torch.no_grad():
        return teacher(input_ids=x, use_cache=False).logits.float()


def perplexity(fn, dataset, batches: int, batch_size: int, seq_len: int, device) -> float:
    """``exp`` of the mean next-token CE of ``fn(x) -> logits`` over fixed batches."""
    total = 0.0
    with torch.no_grad():
        for b in range(batches):
            batch = dataset.batch(b, batch_size, seq_len, seed=EVAL_SEED).to(device)
            logits = fn(batch[:, :-1]).float()
            total += float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))
    return math.exp(total / max(batches, 1))


@torch.no_grad()
def capture(teacher, dataset, batches: int, batch_size: int, seq_len: int, device):
    """Per teacher layer: attention (input, output) and MoE block (input, output) batches."""
    layers = teacher.model.layers
    store = {i: {"attn": [], "moe": []} for i in range(len(layers))}

    def attn_hook(i):
        def hook(mod, args, kwargs, out):
            x = kwargs.get("hidden_states", args[0] if args else None)
            store[i]["attn"].append(
                (x.detach(), (out[0] if isinstance(out, tuple) else out).detach())
            )

        return hook

    def moe_hook(i):
        def hook(mod, args, out):
            store[i]["moe"].append(
                (args[0].detach(), (out[0] if isinstance(out, tuple) else out).detach())
            )

        return hook

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.self_attn.register_forward_hook(attn_hook(i), with_kwargs=True))
        hooks.append(moe_block(layer).register_forward_hook(moe_hook(i)))
    try:
        for b in range(batches):
            batch = dataset.batch(b, batch_size, seq_len, seed=EVAL_SEED + 7).to(device)
            teacher(input_ids=batch[:, :-1], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return store


def regress(module, pairs, steps: int, lr: float, call) -> float:
    """Fit ``call(module, x) ≈ y`` by Adam on MSE; returns R² (explained variance) after."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    var = sum(float(y.var()) for _, y in pairs) / len(pairs)
    for step in range(steps):
        x, y = pairs[step % len(pairs)]
        loss = F.mse_loss(call(module, x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        mse = sum(float(F.mse_loss(call(module, x), y)) for x, y in pairs) / len(pairs)
    return 1.0 - mse / max(var, 1e-12)


def distill_init(student, teacher, acts, steps: int, lr: float) -> dict[str, float]:
    """Regress every PDR mixer onto its replaced attention and every dense FFN onto its MoE."""
    fit = {}
    for i, block in enumerate(student.layers):
        if block.is_gqa:
            moe_x = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in acts[i]["moe"]])
            gate = moe_block(teacher.model.layers[i]).gate.weight
            favourite = int(torch.bincount((moe_x @ gate.T).argmax(-1)).argmax())
            from coordinator.central.convert_map import mixtral_experts

            w1, w2, w3 = mixtral_experts(teacher.model.layers[i])[favourite]
            with torch.no_grad():
                block.ffn.w1.weight.copy_(w1)
                block.ffn.w2.weight.copy_(w2)
                block.ffn.w3.weight.copy_(w3)
            fit[f"ffn{i}_r2"] = regress(block.ffn, acts[i]["moe"], steps, lr, lambda m, x: m(x))
        else:
            fit[f"pdr{i}_r2"] = regress(
                block.mixer, acts[i]["attn"], steps, lr, lambda m, x: m(x)[0]
            )
    return fit


def kd_finetune(student, teacher, dataset, steps: int, lr: float, cfg, device) -> list[float]:
    """``steps`` AdamW steps of ``kd_loss`` (KL to the original model + LM); losses returned."""
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    t, losses = cfg.train, []
    student.train()
    for step in range(steps):
        batch = dataset.batch(step, t.batch_size, t.seq_len, seed=t.seed + 91).to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        loss = kd_loss(student(x).logits, _teacher_logits(teacher, x), y, cfg.ternary.kd_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
    student.eval()
    return losses


def run_convert(source, out_dir: str | Path, *, data, device: str | None = None, **params):
    """Convert a Mixtral (directory or ``MixtralForCausalLM``) and report every step.

    Args:
        source: Hugging Face directory or an in-memory ``MixtralForCausalLM``.
        out_dir: output directory (``converted.safetensors``, ``convert.json``).
        data: prepared corpus tokenised with the source's vocabulary size.
        device: torch device (default CPU).
        **params: fields of :class:`ConvertParams`.

    Returns:
        ``{"teacher_ppl", "steps": [{name, experts, ternary_fraction, ppl, ppl_ratio, ...}],
        "checkpoint", ...}``.

    Raises:
        ConvertError: a bad setting, an unusable source, or a corpus of another vocabulary.
    """
    p = ConvertParams(**params)
    torch.manual_seed(p.seed)
    dev = torch.device(device or "cpu")
    teacher = (load_mixtral(source) if isinstance(source, (str, Path)) else source).to(dev).eval()
    teacher.requires_grad_(False)
    cfg = config_from_mixtral(teacher.config, p.n_experts, p.gqa_every, p.seq_len)
    cfg = replace(cfg, train=replace(cfg.train, batch_size=p.batch_size))
    if data.vocab_size != cfg.model.vocab_size:
        raise ConvertError(f"corpus vocab {data.vocab_size} != source vocab {cfg.model.vocab_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _ConvertRun(teacher, data, p, cfg.train.seq_len, dev)
    student = _convert_steps(run, cfg)
    path = out_dir / "converted.safetensors"
    sha = save_checkpoint(
        path,
        student,
        cfg,
        stage=4,
        step=0,
        extra={
            "converted_from": str(source) if isinstance(source, (str, Path)) else "in-memory",
            "teacher_ppl": run.teacher_ppl,
        },
        tokenizer_sha256=data.tokenizer_sha256,
    )
    result = {
        "teacher_ppl": run.teacher_ppl,
        "config": cfg.to_dict(),
        "steps": run.steps,
        "checkpoint": str(path),
        "checkpoint_sha256": sha,
    }
    write_json_atomic(out_dir / "convert.json", result)
    return result


def _convert_steps(run: _ConvertRun, cfg) -> PerspectiveModel:
    """Map + PDR, grow, ternary (the module's steps), each recorded; the baked student."""
    p, t0 = run.params, time.perf_counter()
    e0 = run.teacher.config.num_local_experts
    student = PerspectiveModel(with_experts(cfg, e0), moe=True).to(run.dev)
    map_weights(run.teacher, student)
    acts = capture(
        run.teacher, run.train, p.distill_batches, p.batch_size, cfg.train.seq_len, run.dev
    )
    fit = distill_init(student, run.teacher, acts, p.distill_steps, p.distill_lr)
    before_kd = run.ppl(lambda x: student(x).logits)
    run.record("map+pdr", student, t0, {"ppl_before_kd": before_kd, "regression_r2": fit})
    gen = torch.Generator().manual_seed(p.seed)
    while student.cfg.moe.n_experts < cfg.moe.n_experts:
        t0 = time.perf_counter()
        grown = with_experts(cfg, 2 * student.cfg.moe.n_experts)
        student = grow_experts(student, grown, p.grow_noise, gen)
        run.record(f"grow{student.cfg.moe.n_experts}", student, t0)
    for frac in cfg.ternary.schedule:
        t0 = time.perf_counter()
        student.set_ternary_fraction(float(frac))
        run.record(f"ternary{int(round(frac * 100))}", student, t0)
    bake_ternary(student, cfg.ternary.threshold_factor)
    return student


class _ConvertRun:
    """The original model, the corpus and the steps recorded so far of one conversion."""

    def __init__(self, teacher, data, params: ConvertParams, seq_len: int, dev) -> None:
        #: the student's sequence length: the params' one, capped by the source's positions
        self.seq_len = seq_len
        self.teacher, self.params, self.dev = teacher, params, dev
        self.train, self.val = data.dataset("train"), data.dataset("val")
        self.steps: list[dict[str, Any]] = []
        self.teacher_ppl = self.ppl(lambda x: _teacher_logits(teacher, x))

    def ppl(self, fn) -> float:
        """Perplexity of ``fn(x) -> logits`` on the run's fixed validation batches."""
        p = self.params
        return perplexity(fn, self.val, p.ppl_batches, p.batch_size, self.seq_len, self.dev)

    def record(self, name: str, model, t0: float, extra: dict[str, Any] | None = None) -> None:
        """KD fine-tune ``model`` against the original, then record its perplexity."""
        p = self.params
        losses = kd_finetune(
            model, self.teacher, self.train, p.kd_steps, p.kd_lr, model.cfg, self.dev
        )
        ppl = self.ppl(lambda x: model(x).logits)
        self.steps.append(
            {
                "step": name,
                "experts": model.cfg.moe.n_experts,
                "ternary_fraction": _fraction(model),
                "ppl": ppl,
                "ppl_ratio": ppl / self.teacher_ppl,
                "kd_loss_first": losses[0] if losses else None,
                "kd_loss_last": losses[-1] if losses else None,
                "seconds": time.perf_counter() - t0,
                **(extra or {}),
            }
        )


@torch.no_grad()
def bake_ternary(model, threshold_factor: float) -> None:
    """Replace expert latents by their ternary values (idempotent) and turn the STE off."""
    from shared_model.ternary import dequantize, ternary_round

    for name, p in model.named_parameters():
        if ".experts." in name:
            trits, scale = ternary_round(p, threshold_factor)
            p.copy_(dequantize(trits, scale, p.dtype))
    model.set_ternary_fraction(None)


def _fraction(model) -> float | None:
    for module in model.modules():
        if hasattr(module, "ternary_fraction") and module.ternary_fraction is not None:
            return float(module.ternary_fraction)
    return None
