"""``federation_bench.py`` with an earlier behaviour of columns changing hands patched in.

The arms of ``docs/federated-training.md`` §5.1 "Columns changing hands" (more nodes than
columns, so a column goes from node to node) compare today's behaviour with the ones it
replaced, side by side on the same seeds, from one checkout::

    python benchmarks/lineage_variants.py VARIANT[,VARIANT...] [federation_bench.py arguments]

``VARIANT`` (several, comma-separated, apply together):

* ``stale-copies``: the lineage is recorded but never acted on (before ``07b276b``): a
  node carries on with its own copy of a column another node trained since.
* ``keep-moments``: a column restarted from the published weights keeps the node's AdamW
  state of its abandoned copy (before ``a587a0c``).
* ``zero-momentum``: it keeps the second moment and step count, and zeroes the first.
* ``one-history``: the update bounds measure fresh and carried-on column updates against
  one history (before the bounds told them apart, ``intake.column_bounds_kind``).
* ``drop-unsent``: a restarted column drops what the node's last delta of it left out
  (starts from the published weights alone, before the rebase of ``_start_columns``).
* ``today``: nothing patched (the same as ``federation_bench.py``).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def _stale_copies() -> None:
    import coordinator.db.leases as leases

    claim = leases.claim_columns

    def recorded_only(session, *, unit, now=None):
        claim(session, unit=unit, now=now)
        return []

    leases.claim_columns = recorded_only


def _keep_moments() -> None:
    from participant.unit_trainer import UnitTrainer

    UnitTrainer._forget_moments = lambda self, columns: None


def _zero_momentum() -> None:
    from participant.unit_trainer import UnitTrainer
    from shared_model.moe import expert_param_names

    def zero_first_moment(self, columns):
        params = dict(self.model.named_parameters())
        for c in columns:
            for name in expert_param_names(self.cfg, c):
                state = self.optimizer.state.get(params[name])
                if state:
                    state["exp_avg"].zero_()

    UnitTrainer._forget_moments = zero_first_moment


def _one_history() -> None:
    import coordinator.intake as intake

    kind = intake.column_bounds_kind
    intake.column_bounds_kind = lambda codec, fresh: kind(codec, False)


def _drop_unsent() -> None:
    from participant.unit_trainer import UnitTrainer

    start = UnitTrainer._start_columns

    def published_only(self, columns, fresh):
        with self._local_lock:
            self.local.unsent.clear()
        return start(self, columns, fresh)

    UnitTrainer._start_columns = published_only


VARIANTS = {
    "stale-copies": _stale_copies,
    "keep-moments": _keep_moments,
    "zero-momentum": _zero_momentum,
    "one-history": _one_history,
    "drop-unsent": _drop_unsent,
    "today": lambda: None,
}


def main(argv: list[str]) -> None:
    """Patch ``argv[0]``'s behaviours in, then run ``federation_bench.py`` with the rest."""
    chosen = argv[0].split(",") if argv else []
    if not chosen or any(v not in VARIANTS for v in chosen):
        raise SystemExit(
            f"usage: lineage_variants.py VARIANT[,VARIANT...] [bench args]; VARIANT one of "
            f"{', '.join(VARIANTS)}"
        )
    for variant in chosen:
        VARIANTS[variant]()
    sys.argv = ["federation_bench.py", *argv[1:]]
    runpy.run_path(str(Path(__file__).with_name("federation_bench.py")), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
