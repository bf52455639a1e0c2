"""The one command-line entry point: ``perspective``.

This root knows neither side of the network. Each side registers its sub-commands
through the ``perspective.commands`` entry-point group in ``pyproject.toml``: the entry
point's name is the top-level command, its value a ``register(app)`` function. Only the
entry point named on the command line is imported, so ``perspective participant ...``
never imports the coordinator (and ``--help`` imports every registrar, which are light:
heavy imports such as torch, flwr and grpc happen inside the commands).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.metadata import EntryPoint, entry_points

import typer

#: The entry-point group each side registers its sub-commands in.
COMMAND_GROUP = "perspective.commands"

HELP = "Perspective: federated training of a ternary mixture-of-experts language model."


def command_entry_points() -> list[EntryPoint]:
    """The registered sub-command entry points, sorted by command name.

    Raises:
        RuntimeError: When none is registered (the package is not installed, e.g. run
            from a source tree without ``pip install -e .``).
    """
    found = sorted(entry_points(group=COMMAND_GROUP), key=lambda ep: ep.name)
    if not found:
        raise RuntimeError(
            f"no '{COMMAND_GROUP}' entry points are installed; install the package "
            "(`pip install -e .` or `make test`) so the sub-commands are registered"
        )
    return found


def build_app(argv: Sequence[str] = ()) -> typer.Typer:
    """A fresh ``perspective`` application with the sub-commands ``argv`` needs.

    Only the entry point named by ``argv[0]`` is imported; with no match (``--help``, an
    unknown command, an empty ``argv``) every registered entry point is.

    Args:
        argv: The command line without the program name.
    """
    app = typer.Typer(
        name="perspective", help=HELP, no_args_is_help=True, pretty_exceptions_enable=False
    )
    app.callback(help=HELP)(lambda: None)
    eps = command_entry_points()
    wanted = [ep for ep in eps if argv and ep.name == argv[0]]
    for ep in wanted or eps:
        ep.load()(app)
    return app


def main() -> None:
    """Console-script entry point."""
    build_app(sys.argv[1:])()


if __name__ == "__main__":
    main()
