"""``flower-supernode`` with a shorter poll: ``python -m participant.flower.supernode_main
--poll-interval S [flower-supernode arguments]``.

Flower 1.42's SuperNode (``flwr.supernode.start_client_internal``) hands its worker one
message at a time: it pulls a message, waits for the reply in steps of 0.5 s, pushes it,
and pulls again; when the SuperLink has nothing for it, it sleeps 3 s. All three sleeps are
hard-coded. A participant whose units train for a second or two (the ``tiny`` preset of the
laptop network and the tests) then spends most of its time in them: the coordinator leases
the next unit only after the previous result arrives, and the node sees it up to 3 s later.

This entry point caps those sleeps at ``S`` and otherwise runs Flower's own
``flower-supernode``. It changes nothing else: what is pulled, pushed and retried is
Flower's. It is opt-in (``participant run`` / ``participant local --poll-interval``): a
shorter poll costs the SuperLink one ``PullMessages`` per node per ``S`` while idle, and it
makes a Flower 1.42 race likelier (a run stopped while the node pulls a message leaves that
reply unpushed, and the node then pushes every reply one message late; docs/architecture.md,
"Pipelined participants"). Flower is pinned to 1.42.*; a Flower whose module no longer
sleeps through its own ``time`` is refused with a message, not silently left slow.
"""

from __future__ import annotations

import sys
import time
import types

#: Flower 1.42's own idle poll (``start_client_internal``), the default of ``participant run``.
FLOWER_POLL_S = 3.0
#: Shortest poll accepted: below it a node mostly asks the SuperLink for nothing.
MIN_POLL_S = 0.05


class PollError(ValueError):
    """The poll interval is unusable, or this Flower cannot have its poll shortened."""


def check_poll_interval(seconds: float) -> float:
    """``seconds`` if it is a usable poll interval, else :class:`PollError` saying why."""
    if not MIN_POLL_S <= seconds <= FLOWER_POLL_S:
        raise PollError(
            f"poll interval {seconds!r} s is invalid: allowed {MIN_POLL_S} to {FLOWER_POLL_S} s "
            f"(Flower's own)"
        )
    return seconds


def shorten_poll(seconds: float, sleep=time.sleep) -> types.SimpleNamespace:
    """Cap every sleep of Flower's SuperNode loop at ``seconds``; returns the ``time``
    stand-in now installed in ``flwr.supernode.start_client_internal``.

    Raises:
        PollError: bad interval, or the module does not use ``time`` as 1.42 does.
    """
    from flwr.supernode import start_client_internal as loop

    check_poll_interval(seconds)
    if getattr(loop, "time", None) is not time and not getattr(loop.time, "capped", False):
        raise PollError(
            "this Flower's SuperNode loop does not sleep through time.sleep as flwr 1.42 "
            "does; run the plain flower-supernode (no --poll-interval)"
        )
    stand_in = types.SimpleNamespace(
        **{name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    )
    stand_in.sleep = lambda s: sleep(min(s, seconds))
    stand_in.capped = True
    loop.time = stand_in
    return stand_in


def main(argv: list[str] | None = None) -> None:
    """Parse ``--poll-interval S`` off the front of ``argv``, then run ``flower-supernode``
    with the rest."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "--poll-interval":
        sys.exit("usage: python -m participant.flower.supernode_main --poll-interval S [...]")
    try:
        shorten_poll(float(args[1]))
    except (PollError, ValueError) as exc:
        sys.exit(f"supernode: {exc}")
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args[2:]]
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
