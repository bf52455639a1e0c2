"""Participant: the volunteer daemon and its Flower worker."""
