"""Pieces of the federated protocol shared by the coordinator and participants.

* :mod:`.updates` — FP tensor updates encoded with the codec (dense ternary or sparse
  top-k), bundled into one blob, decoded with validation;
* :mod:`.replica` — a published version held locally (shared weights + some columns),
  advanced bit-identically by applying version manifests.
"""
