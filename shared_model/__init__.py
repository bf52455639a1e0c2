"""Perspective model, training, codec and data code shared by coordinator and participants."""
