"""Autoregressive sampling with incremental decoding (PDR state + GQA KV cache)."""

from __future__ import annotations

import torch
from torch import Tensor

from shared_model.model import InferenceCache, ModelError, PerspectiveModel


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick next tokens ``[B, 1]`` from last-position logits ``[B, V]``.

    ``temperature == 0`` means greedy (arg-max); ``top_k`` keeps the k best tokens.
    """
    if temperature < 0:
        raise ModelError(f"temperature = {temperature!r} is invalid: allowed >= 0")
    if top_k is not None and top_k < 1:
        raise ModelError(f"top_k = {top_k!r} is invalid: allowed an integer >= 1 or None")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(
    model: PerspectiveModel,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    cache: bool = True,
    columns: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Extend ``idx`` ``[B, T]`` by ``max_new_tokens`` sampled tokens.

    Args:
        model: the model (put it in eval mode; there is no dropout, so this is optional).
        idx: prompt token ids, ``T >= 1``.
        max_new_tokens: number of tokens to append.
        temperature: 0 for greedy decoding.
        top_k: sample only among the k most likely tokens.
        cache: decode incrementally (O(1) per token for PDR, ``window`` keys for GQA);
            False re-runs the full sequence for every token (reference behaviour).
        columns: ``[B]`` expert columns for column-mode MoE generation.
        generator: RNG for reproducible sampling.

    Returns:
        ``[B, T + max_new_tokens]`` token ids.
    """
    if idx.dim() != 2 or idx.shape[1] < 1:
        raise ModelError("generate needs a prompt of shape [B, T] with T >= 1")
    if max_new_tokens < 0:
        raise ModelError(f"max_new_tokens = {max_new_tokens!r} is invalid: allowed >= 0")
    state = InferenceCache() if cache else None
    step_input = idx
    for _ in range(max_new_tokens):
        if state is None:
            logits = model(idx, columns=columns).logits[:, -1]
        else:
            logits = model(step_input, columns=columns, cache=state).logits[:, -1]
        step_input = sample_next(logits, temperature, top_k, generator)
        idx = torch.cat([idx, step_input], dim=1)
    return idx
