"""Error feedback: send ``decode(encode(residual + update))``, keep the rest (DESIGN §3).

Compressing an update drops most of it; error feedback keeps what was dropped and adds
it to the next update, so nothing is lost, only delayed. Both sides use this one step:

* a participant's shared pseudo-gradient: the residual is kept on disk across units;
* the coordinator's versions: the update is ``master - published`` and the residual is
  implicit (what is not sent now stays in ``master - published`` for the next version).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared_model.federated.updates import encode_bundle

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Sent:
    """One error-feedback step."""

    bundle: bytes
    #: ``residual + update``: what was owed to the receiver before this send.
    pending: State
    #: What the receiver decodes (bit-exact).
    decoded: State
    #: ``pending - decoded``: the residual owed with the next send.
    residual: State


def send_with_feedback(
    update: State,
    residual: State,
    codec: str,
    *,
    kind: str,
    column: int,
    base_version: int,
    base: State | None = None,
) -> Sent:
    """Encode ``residual + update`` into a bundle and keep what the codec dropped.

    ``residual`` may lack tensors (nothing owed yet). The bundle arguments are those of
    :func:`~shared_model.federated.updates.encode_bundle`.
    """
    pending = {k: v + residual[k] if k in residual else v for k, v in update.items()}
    bundle, decoded = encode_bundle(
        pending, codec, kind=kind, column=column, base_version=base_version, base=base
    )
    rest = {k: pending[k] - decoded[k] for k in pending}
    return Sent(bundle=bundle, pending=pending, decoded=decoded, residual=rest)
