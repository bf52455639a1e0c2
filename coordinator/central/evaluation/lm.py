"""Our model behind the lm-evaluation-harness interface.

:class:`PerspectiveLM` implements the three request types of ``lm_eval.api.model.LM``
(``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``) on plain tuples, so our
own task runner and tests use exactly the code lm-eval would call. :func:`lm_eval_adapter`
wraps it in a real ``lm_eval.api.model.LM`` subclass when lm-eval is installed; without it
this module still imports and the function raises with the install command.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

LM_EVAL_HINT = "lm-eval is not installed: pip install lm-eval  (then use lm_eval_adapter(...))"


class EvalError(ValueError):
    """Invalid evaluation input (task file, request, checkpoint)."""


def _args(request: Any) -> tuple:
    """Request arguments: lm-eval ``Instance`` objects carry them in ``.args``."""
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


class PerspectiveLM:
    """Scoring and generation with a Perspective model and its ``tokenizers`` tokenizer."""

    def __init__(self, model, tokenizer, max_length: int | None = None, eot_id: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length or model.cfg.model.max_seq_len
        self.eot_id = eot_id
        self.device = next(model.parameters()).device

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @torch.no_grad()
    def _continuation_logprob(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        if not cont:
            raise EvalError("a continuation must encode to at least one token")
        seq = (ctx or [self.eot_id or 0]) + cont
        seq = seq[-(self.max_length + 1) :]
        x = torch.tensor([seq[:-1]], device=self.device)
        logp = F.log_softmax(self.model(x).logits[0].float(), -1)
        n = len(cont)
        targets = torch.tensor(seq[-n:], device=self.device)
        picked = logp[-n:].gather(1, targets[:, None]).squeeze(1)
        greedy = bool((logp[-n:].argmax(-1) == targets).all())
        return float(picked.sum()), greedy

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), is greedy)`` per ``(context, continuation)``."""
        out = []
        for req in requests:
            ctx, cont = _args(req)[:2]
            out.append(self._continuation_logprob(self.encode(ctx), self.encode(cont)))
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        """Total log-likelihood of each ``(text,)`` in windows of ``max_length`` tokens."""
        out = []
        for req in requests:
            ids = self.encode(_args(req)[0])
            total, bos = 0.0, [self.eot_id or 0]
            for s in range(0, len(ids), self.max_length):
                # each window is scored with as much preceding text as fits in the context
                lp, _ = self._continuation_logprob(bos + ids[:s], ids[s : s + self.max_length])
                total += lp
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy continuation of each ``(context, {"until": [...], "max_gen_toks": n})``."""
        from coordinator.central.generate import generate

        out = []
        for req in requests:
            ctx, kwargs = _args(req)[:2]
            until = list(kwargs.get("until", []) or [])
            max_new = int(kwargs.get("max_gen_toks", 32))
            ids = self.encode(ctx)[-(self.max_length - max_new) :] or [self.eot_id or 0]
            full = generate(self.model, torch.tensor([ids], device=self.device), max_new, 0.0)
            text = self.tokenizer.decode(full[0, len(ids) :].tolist())
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


def lm_eval_adapter(model, tokenizer, **kwargs: Any):
    """A ``lm_eval.api.model.LM`` instance wrapping :class:`PerspectiveLM`.

    Raises:
        EvalError: lm-eval is not installed (the message says how to install it).
    """
    try:
        from lm_eval.api.model import LM
    except ImportError as exc:
        raise EvalError(LM_EVAL_HINT) from exc

    class PerspectiveLMEval(LM):
        def __init__(self) -> None:
            super().__init__()
            self.core = PerspectiveLM(model, tokenizer, **kwargs)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.core.loglikelihood(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.core.loglikelihood_rolling(requests)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self.core.generate_until(requests)

    return PerspectiveLMEval()
