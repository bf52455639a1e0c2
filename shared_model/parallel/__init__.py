"""Distributed centralised training: process groups, FSDP2, expert parallelism, DCP checkpoints.

* :mod:`~shared_model.parallel.distributed`: process group from the ``torchrun`` environment
  (gloo on CPU, nccl on GPU) and small collective helpers that are no-ops on one process;
* :mod:`~shared_model.parallel.fsdp`: FSDP2 ``fully_shard`` of the shared layers, per block;
* :mod:`~shared_model.parallel.expert_parallel`: experts sharded over ranks, tokens
  exchanged with ``all_to_all_single`` (:class:`ExpertParallelMoE`);
* :mod:`~shared_model.parallel.checkpointing`: ``torch.distributed.checkpoint`` save/load
  across world sizes and conversion to/from the single-file safetensors checkpoint;
* :mod:`~shared_model.parallel.train_dist`: the distributed trainer (``torchrun`` entry).
"""
