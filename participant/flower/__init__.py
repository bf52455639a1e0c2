"""Flower glue on a participant: SuperNode process and the long-lived worker."""
