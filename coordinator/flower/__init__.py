"""Flower glue on the coordinator: SuperLink process, run creation, push/pull driver."""
