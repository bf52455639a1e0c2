"""Pieces of the federated protocol shared by the coordinator and participants.

* :mod:`.updates` — FP tensor updates encoded with the codec (dense ternary or sparse
  top-k), bundled into one blob (:func:`~.updates.encode_bundle`), decoded with
  validation (:func:`~.updates.read_bundle`), and error feedback
  (:func:`~.updates.send_with_feedback`: send ``decode(encode(residual + update))``, keep
  the rest; the participant's shared pseudo-gradient and the coordinator's versions);
* :mod:`.replica` — a published version held locally (shared weights + some columns),
  advanced bit-identically by applying version manifests.
"""
