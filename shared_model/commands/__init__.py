"""CLI command groups. Each module has ``register(app: typer.Typer) -> None``.

Add a new group by writing its module and appending its ``register`` here.
"""

from __future__ import annotations

from collections.abc import Callable

import typer

from coordinator import cli as coordinator_cli
from coordinator import demo
from participant import cli as participant_cli
from shared_model.commands import codec, convert, generate, manifold, plan, stage, train
from shared_model.commands import eval as eval_cmd

REGISTRARS: list[Callable[[typer.Typer], None]] = [
    coordinator_cli.register,
    demo.register,  # before train: train adds a central-only demo when none exists
    participant_cli.register,
    codec.register,
    generate.register,
    plan.register,
    train.register,
    manifold.register,
    eval_cmd.register,
    convert.register,
    stage.register,
]
