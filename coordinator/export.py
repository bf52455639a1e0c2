"""``perspective coordinator export``: a published version as a Perspective checkpoint.

What the network trained lives in the coordinator's blob store as a version chain
(:mod:`coordinator.publishing`): full checkpoint manifests every ``checkpoint_every``
versions and one version manifest per version in between, named by the ``model_versions``
rows (``checkpoint_id``, ``checksum`` = the version manifest's content id). The export
walks that chain back from the asked version to its newest checkpoint, re-checks every
blob's content id, and applies the manifests with the participants' own
:class:`~shared_model.federated.replica.Replica` holding every column, which checks each
resulting tensor against the sha256 the manifest carries. The result is exactly the
published model of that version, written as an ordinary checkpoint
(:func:`coordinator.central.checkpoint.save_checkpoint`) that ``perspective generate``,
``perspective eval`` and stage 5 take, next to the corpus's tokenizer.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import typer

from shared_model.files import write_json_atomic

CHECKPOINT_NAME = "model.safetensors"


class ExportError(RuntimeError):
    """The version cannot be exported (unknown, blobs gone or corrupt, no network record)."""


@dataclass(frozen=True)
class Exported:
    """Where the export wrote what."""

    version: int
    stage: int
    checkpoint: Path
    tokenizer: Path | None
    data_args: str  # what eval / stage 5 need to use the network's corpus


def _network_record(work_dir: Path) -> dict:
    # Imported here: the coordinator process pulls in torch, which every CLI call (even
    # `--help` or a refused argument) would otherwise pay for (~2 s).
    from coordinator.coordinator_process import NETWORK_FILE

    path = work_dir / NETWORK_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ExportError(
            f"{path} does not exist: give the --work-dir of a coordinator that has run "
            "'coordinator serve' (or the demo's <work-dir>/coordinator)"
        ) from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from exc


def _chain(session, version: int | None) -> tuple[list, object]:
    """Version rows from the newest checkpoint up to ``version`` (latest when None)."""
    from coordinator.db import versions as db_versions
    from coordinator.db.errors import NotFound

    try:
        row = (
            db_versions.latest_version(session)
            if version is None
            else db_versions.get_version(session, version=version)
        )
    except NotFound as exc:
        raise ExportError(f"{exc}: list them with GET /api/v1/versions") from exc
    if row is None:
        raise ExportError("the coordinator has published no version yet")
    target, rows = row, [row]
    while rows[-1].checkpoint_id is None:
        if rows[-1].parent is None:
            raise ExportError(f"version {target.version} has no checkpoint in its chain")
        rows.append(db_versions.get_version(session, version=rows[-1].parent))
    return rows[::-1], target


def _fetch(store):
    from shared_model.blobs import BlobError

    def fetch(ref_or_id) -> bytes:
        cid = ref_or_id if isinstance(ref_or_id, str) else ref_or_id.content_id
        try:
            return store.get(cid, verify=True)
        except BlobError as exc:
            raise ExportError(
                f"blob {cid} of the version chain is not usable ({exc}); it may have been "
                "collected: export a newer version (e.g. --version latest)"
            ) from exc

    return fetch


def export_version(
    *, work_dir: Path, db_url: str | None, version: int | None, out: Path
) -> Exported:
    """Rebuild version ``version`` (None: the latest) and write it under ``out``.

    Raises:
        ExportError: unknown version, missing/corrupt blobs or digests, no network record.
    """
    from coordinator.central.checkpoint import save_checkpoint
    from coordinator.db import init_db, make_session_factory
    from shared_model.blobs import BlobStore
    from shared_model.config_loading import config_from_dict
    from shared_model.federated.replica import Replica, SyncError
    from shared_model.wire.perspective.v1 import control_pb2

    network = _network_record(work_dir)
    cfg = config_from_dict(network["config"])
    engine = init_db(db_url or f"sqlite:///{work_dir / 'coordinator.db'}")
    try:
        with make_session_factory(engine)() as s:
            rows, target = _chain(s, version)
            chain_ids = [r.checksum for r in rows[1:]]
            start_id, stage_name = rows[0].checkpoint_id, target.stage or ""
            tokens = int((target.metrics or {}).get("tokens", 0))
            target_version = target.version
    finally:
        engine.dispose()
    fetch = _fetch(BlobStore(work_dir / "blobs"))
    replica = Replica()
    try:
        replica.sync(
            control_pb2.CheckpointManifest.FromString(fetch(start_id)),
            [control_pb2.VersionManifest.FromString(fetch(cid)) for cid in chain_ids],
            list(range(cfg.moe.n_experts)),
            fetch,
        )
    except SyncError as exc:
        raise ExportError(f"version {target_version} does not verify: {exc}") from exc
    model = _model(cfg, replica)
    stage = int(stage_name.removeprefix("stage") or 3)
    out.mkdir(parents=True, exist_ok=True)
    record = {"version": target_version, "stage": stage_name, "corpus": network["corpus"]}
    checkpoint = out / CHECKPOINT_NAME
    save_checkpoint(checkpoint, model, cfg, stage=stage, step=target_version, tokens=tokens,
                    extra={"federated": record},
                    tokenizer_sha256=network["corpus"].get("tokenizer_sha256"))  # fmt: skip
    tokenizer = _copy_tokenizer(network["corpus"], out)
    write_json_atomic(out / "export.json", record)
    return Exported(target_version, stage, checkpoint, tokenizer, _data_args(network, cfg))


def _model(cfg, replica):
    """The full MoE model of the replica's published tensors (every weight accounted for)."""
    from shared_model.model import ModelError, PerspectiveModel

    try:
        return PerspectiveModel.from_weights(cfg, replica.shared, replica.columns)
    except ModelError as exc:
        raise ExportError(f"the published weights do not fit the model: {exc}") from exc


def _data_args(network: dict, cfg) -> str:
    """``--data ...`` for eval / stage 5: the network's corpus, from its prepared cache."""
    from coordinator.coordinator_process import demo_corpus_bytes

    corpus = network["corpus"]
    source = corpus.get("source") or "stdlib"
    if source == "stdlib":
        max_bytes = demo_corpus_bytes(cfg.name)
        return "--data stdlib" + (f" --max-bytes {max_bytes}" if max_bytes else "")
    return f"--data {source} --data-dir {Path(corpus['root']).parent}"


def _copy_tokenizer(corpus: dict, out: Path) -> Path | None:
    """The corpus's tokenizer next to the checkpoint (``generate`` picks it up)."""
    src = Path(corpus.get("root") or "") / "tokenizer.json"
    if not src.is_file():
        return None
    return Path(shutil.copyfile(src, out / "tokenizer.json"))


def parse_version(text: str) -> int | None:
    """``latest`` → None, else a version number >= 0.

    Raises:
        typer.BadParameter: neither.
    """
    if text == "latest":
        return None
    if text.isdigit():
        return int(text)
    raise typer.BadParameter(f"--version must be a version number or 'latest', got {text!r}")


def how_to_use(exported: Exported) -> list[str]:
    """The commands that use an export (printed by the export and the demo's summary)."""
    ckpt, data = exported.checkpoint, exported.data_args
    return [
        f"perspective generate --checkpoint {ckpt} --prompt 'def '",
        f"perspective eval --checkpoint {ckpt} {data} --out {ckpt.parent / 'eval'}",
        f"perspective manifold run --checkpoint {ckpt} {data} --out {ckpt.parent / 'stage5'}",
    ]


def export(
    work_dir: Path = typer.Option(..., help="The coordinator's --work-dir (blobs, network.json)."),
    out: Path = typer.Option(..., help="Directory for model.safetensors + tokenizer.json."),
    version: str = typer.Option("latest", help="Version number or 'latest'."),
    db: str | None = typer.Option(
        None, envvar="PERSPECTIVE_DB", help="Database URL [default: <work-dir>/coordinator.db]."
    ),
) -> None:
    """Export a published version as a checkpoint for generate, eval and stage 5."""
    from coordinator.central.checkpoint import CheckpointError
    from coordinator.db import DatabaseConfigError

    try:
        exported = export_version(work_dir=work_dir, db_url=db, version=parse_version(version),
                                  out=out)  # fmt: skip
    except (ExportError, CheckpointError, DatabaseConfigError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc
    typer.echo(f"version {exported.version} (stage {exported.stage}) -> {exported.checkpoint}")
    for line in how_to_use(exported):
        typer.echo(f"  {line}")
