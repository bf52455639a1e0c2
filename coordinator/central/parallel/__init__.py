"""Distributed centralised training: process groups, FSDP2, expert parallelism, DCP checkpoints.

* :mod:`~coordinator.central.parallel.distributed`: process group from the ``torchrun`` environment
  (gloo on CPU, nccl on GPU) and small collective helpers that are no-ops on one process;
* :mod:`~coordinator.central.parallel.fsdp`: FSDP2 ``fully_shard`` of the shared layers, per block;
* :mod:`~coordinator.central.parallel.expert_parallel`: experts sharded over ranks, tokens
  exchanged with ``all_to_all_single`` (:class:`ExpertParallelMoE`);
* :mod:`~coordinator.central.parallel.checkpointing`: ``torch.distributed.checkpoint`` save/load
  across world sizes and conversion to/from the single-file safetensors checkpoint;
* :mod:`~coordinator.central.parallel.train_dist`: the distributed trainer (``torchrun`` entry).
"""
