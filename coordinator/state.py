"""The coordinator's model state: FP masters, published versions, checkpoints.

The masters (shared layers + every expert column, FP32) are what the aggregators
(:mod:`coordinator.aggregation`) update. What participants see is the *published* state,
advanced one version at a time by :mod:`coordinator.publishing` (the version chain and
checkpoints in the blob store).

Durability: :meth:`save` writes masters, published state, optimiser buffers and the
version to one safetensors file (temp + rename); on restart the loop reloads it and
re-applies the accepted results recorded after it (DB: ``applied_in_version`` is NULL).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from coordinator.aggregation import ColumnAggregator, OuterOptimizer, SharedAggregator
from coordinator.aggregation.diversity import apply_diversity
from coordinator.federation_settings import FederationSettings
from coordinator.publishing import Publisher
from shared_model.blobs import BlobStore
from shared_model.config import PerspectiveConfig
from shared_model.model import PerspectiveModel, expert_param_names

State = dict[str, torch.Tensor]


class CoordinatorState:
    """Masters, aggregators and the published version chain of one federated stage."""

    def __init__(
        self,
        cfg: PerspectiveConfig,
        model: PerspectiveModel,
        store: BlobStore,
        settings: FederationSettings,
        *,
        version: int = 0,
    ) -> None:
        """Masters from ``model``; codec, buffer, staleness, checkpoint period, outer
        optimiser, trim and diversity lr from ``settings`` (they have no defaults here)."""
        self.cfg, self.store = cfg, store
        self.diversity_lr = settings.diversity_lr
        n = cfg.moe.n_experts
        self.columns = ColumnAggregator(
            {c: model.expert_state(c) for c in range(n)}, version, settings.max_staleness
        )
        self.shared = SharedAggregator(
            model.shared_state(),
            buffer_size=settings.buffer_size,
            outer=OuterOptimizer(settings.outer_lr, settings.outer_momentum),
            trim=settings.trim,
        )
        self.publisher = Publisher(
            store,
            self.columns,
            self.shared,
            version=version,
            codec=settings.shared_codec,
            checkpoint_every=settings.checkpoint_every,
        )

    @property
    def version(self) -> int:
        """The newest published version."""
        return self.publisher.version

    def publish(self) -> int:
        """Take the diversity step (if any) and publish the masters as the next version."""
        if self.diversity_lr > 0:
            self._diversity_step()
        return self.publisher.publish()

    def _diversity_step(self) -> None:
        beta = self.cfg.moe.diversity_beta
        columns = sorted(self.columns.masters)
        # Parameter names carry the expert index, so the same weight of every column is
        # found by position in each column's (identically ordered) name list.
        names = {c: expert_param_names(self.cfg, c) for c in columns}
        for i in range(len(names[columns[0]])):
            apply_diversity(
                [self.columns.masters[c][names[c][i]] for c in columns], beta, self.diversity_lr
            )
        self.columns.mark_dirty(self.columns.masters)

    def published_model(self) -> PerspectiveModel:
        """A full MoE model holding the current published weights (for evaluation)."""
        model = PerspectiveModel(self.cfg, moe=True)
        model.load_state_dict(self.shared.published, strict=False)
        for column in self.columns.masters:
            model.load_expert_state(column, self.columns.published(column))
        return model.eval()

    # --- durability ------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the whole state to ``path`` atomically."""
        flat: State = {}
        for prefix, state in (
            ("shared.master", self.shared.master),
            ("shared.published", self.shared.published),
            ("shared.momentum", self.shared.outer.buffers),
        ):
            flat.update({f"{prefix}/{k}": v for k, v in state.items()})
        for c, state in self.columns.masters.items():
            flat.update({f"column.master/{c}/{k}": v for k, v in state.items()})
            for v, pub in self.columns.history(c):
                flat.update({f"column.published/{c}/{v}/{k}": t for k, t in pub.items()})
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        contiguous = {k: v.detach().contiguous() for k, v in flat.items()}
        save_file(contiguous, str(tmp), metadata=self.publisher.metadata())
        tmp.replace(path)

    def load(self, path: str | Path) -> None:
        """Restore what :meth:`save` wrote (the config must match)."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        flat = load_file(str(path))
        self.publisher.restore(meta)
        self.shared.master = _section(flat, "shared.master")
        self.shared.published = _section(flat, "shared.published")
        self.shared.outer.buffers = _section(flat, "shared.momentum")
        for c in list(self.columns.masters):
            self.columns.masters[c] = _section(flat, f"column.master/{c}")
            prefix = f"column.published/{c}/"
            versions = {
                int(k[len(prefix) :].split("/", 1)[0]) for k in flat if k.startswith(prefix)
            }
            self.columns.restore_history(
                c, [(v, _section(flat, f"{prefix}{v}")) for v in sorted(versions)]
            )


def _section(flat: State, prefix: str) -> State:
    head = prefix + "/"
    return {k[len(head) :]: v for k, v in flat.items() if k.startswith(head)}
