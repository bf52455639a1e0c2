"""The one command-line entry point: ``perspective``.

Sub-commands live next to the code they drive; this module only assembles them.
Heavy imports (torch, flwr, grpc) happen inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="perspective",
    help="Perspective: federated training of a ternary mixture-of-experts language model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Perspective: federated training of a ternary mixture-of-experts language model."""


def _register() -> None:
    # Each module exposes ``register(app)`` which adds its commands or sub-typers.
    from shared_model.commands import REGISTRARS

    for register in REGISTRARS:
        register(app)


def main() -> None:
    """Console-script entry point."""
    _register()
    app()


if __name__ == "__main__":
    main()
