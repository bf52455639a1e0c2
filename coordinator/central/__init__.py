"""Centralised stages run by the coordinator.

Trainer, distributed training, stages 5-7, conversion.
"""
