"""Training data: corpora, the prepared (tokenised, sharded) corpus cache and batching.

* A **corpus** is an ordered list of named text documents: the ``.py`` files of the
  running interpreter's standard library (offline demo corpus; ``site-packages`` and
  test directories skipped), any directory of ``.txt`` / ``.jsonl`` files or one such
  file (JSONL: one document per line, its ``text`` field), or ``hf:NAME[:split]``, a
  Hugging Face ``datasets`` dataset read from the local cache or a ``save_to_disk``
  directory (the optional ``datasets`` library; never downloads).
* Each document goes to ``train`` or ``val`` by a hash of its name (default 5 % val), so
  the split is stable when documents are added or removed.
* :func:`prepare_corpus` trains the tokenizer, tokenises the documents into
  content-addressed shards (:mod:`shared_model.shards`) and writes ``manifest.json``;
  the result is cached under ``data_dir/<source>-<fingerprint>-v<vocab>`` and reused.
* :class:`DocumentDataset` holds one split's tokens (documents joined by ``<|endoftext|>``)
  and gives ``(B, T + 1)`` batches that depend only on ``(seed, position)``, so a
  checkpoint that records the position resumes bit-identically. Federated participants
  build datasets from a subset of document ids (:meth:`DocumentDataset.subset`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared_model import tokenizer as tk
from shared_model.shards import (
    DataError,
    Shard,
    encode_shard,
    read_shard,
    token_dtype,
    write_shard,
)

FORMAT_VERSION = 1
VAL_FRACTION = 0.05
SHARD_TOKENS = 1 << 18
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}

__all__ = [
    "DataError",
    "Document",
    "DocumentDataset",
    "PreparedCorpus",
    "default_data_dir",
    "SOURCE_HELP",
    "load_corpus",
    "parse_hf_source",
    "source_tag",
    "prepare_corpus",
    "split_of",
]


@dataclass(frozen=True)
class Document:
    """One named text document."""

    name: str
    text: str


def default_data_dir() -> Path:
    """``$PERSPECTIVE_DATA_DIR`` or ``~/.cache/perspective``."""
    return Path(os.environ.get("PERSPECTIVE_DATA_DIR", Path.home() / ".cache" / "perspective"))


def _stdlib_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    return [
        Document(str(p.relative_to(root)), p.read_text("utf-8", errors="replace")) for p in files
    ]


SOURCE_HELP = "'stdlib', a directory of .txt/.jsonl files, a .jsonl/.txt file or hf:NAME[:split]"


def _file_documents(path: Path, rel: str) -> list[Document]:
    """One ``.txt`` file (one document) or ``.jsonl`` file (one document per line)."""
    try:
        text = path.read_text("utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"cannot read corpus file {path}: {exc.strerror or exc}") from exc
    if path.suffix == ".txt":
        return [Document(rel, text)]
    docs: list[Document] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(
                f"{path}:{lineno}: each JSONL line must be an object with a 'text' string"
            ) from exc
        if not isinstance(value, str):
            raise DataError(f"{path}:{lineno}: 'text' must be a string")
        docs.append(Document(f"{rel}:{lineno}", value))
    return docs


def _directory_documents(root: Path) -> list[Document]:
    docs: list[Document] = []
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".txt", ".jsonl")):
        docs += _file_documents(path, str(path.relative_to(root)))
    return docs


def parse_hf_source(source: str) -> tuple[str, str]:
    """``hf:NAME[:split]`` → ``(NAME, split)`` (split defaults to ``train``).

    Raises:
        DataError: no name after ``hf:``.
    """
    name, _, split = source.removeprefix("hf:").partition(":")
    if not name:
        raise DataError(f"corpus {source!r}: give hf:NAME[:split], e.g. hf:wikitext:train")
    return name, split or "train"


def _offline_datasets(source: str):
    """The ``datasets`` module, switched to the local cache only.

    ``datasets`` reads ``HF_DATASETS_OFFLINE`` but fetches through ``huggingface_hub``,
    which reads ``HF_HUB_OFFLINE`` once, at its import: without both, a name missing from
    the cache costs five retried requests to the Hub (about 25 s) before the error. Either
    may have been imported already (e.g. by ``transformers``), hence their flags too.
    """
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets
        import huggingface_hub.constants
    except ImportError as exc:
        raise DataError(
            f"corpus {source!r} needs the Hugging Face 'datasets' library: "
            "pip install 'perspective[hf]' (or pip install datasets)"
        ) from exc
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    return datasets


def _hf_documents(source: str) -> list[Document]:
    """Documents of a Hugging Face ``datasets`` dataset, from the local cache only.

    ``NAME`` is a dataset directory written by ``Dataset.save_to_disk`` or the name of a
    dataset already in the local ``datasets`` cache; nothing is downloaded. Each row's
    ``text`` column is one document.
    """
    name, split = parse_hf_source(source)
    datasets = _offline_datasets(source)
    try:
        if Path(name).is_dir():
            ds = datasets.load_from_disk(name)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; all mean "not usable"
        raise DataError(
            f"corpus {source!r}: cannot load split {split!r} from the local datasets cache "
            f"({type(exc).__name__}: {exc}); download it first (datasets.load_dataset) or "
            "give a directory written by Dataset.save_to_disk"
        ) from exc
    if "text" not in ds.column_names:
        raise DataError(f"corpus {source!r} has no 'text' column (columns: {ds.column_names})")
    docs = []
    for i, text in enumerate(ds["text"]):
        if not isinstance(text, str):
            raise DataError(f"corpus {source!r}: row {i}: 'text' must be a string")
        docs.append(Document(f"{name}:{split}:{i}", text))
    return docs


def _source_documents(source: str) -> list[Document]:
    if source == "stdlib":
        return _stdlib_documents()
    if source.startswith("hf:"):
        return _hf_documents(source)
    path = Path(source)
    if path.is_dir():
        return _directory_documents(path)
    if path.is_file() and path.suffix in (".txt", ".jsonl"):
        return _file_documents(path, path.name)
    if path.exists():
        raise DataError(f"corpus {path} is neither a directory nor a .txt/.jsonl file")
    raise DataError(f"corpus {path} does not exist: give {SOURCE_HELP}")


def load_corpus(source: str | Path = "stdlib", max_bytes: int | None = None) -> list[Document]:
    """Load a corpus in its canonical (sorted) order.

    Args:
        source: ``"stdlib"``, a directory of ``.txt`` / ``.jsonl`` files, one such file, or
            ``hf:NAME[:split]`` (a local Hugging Face ``datasets`` dataset).
        max_bytes: keep only the first documents up to about this many characters
            (used by the ``tiny`` preset and tests to stay fast).

    Raises:
        DataError: the source does not exist, cannot be read or holds no non-empty document.
    """
    docs = [d for d in _source_documents(str(source)) if d.text.strip()]
    if max_bytes is not None:
        kept, total = [], 0
        for d in docs:
            if total >= max_bytes:
                break
            kept.append(d)
            total += len(d.text)
        docs = kept
    if not docs:
        raise DataError(f"corpus {source} has no non-empty document: give {SOURCE_HELP}")
    return docs


def source_tag(source: str | Path) -> str:
    """A file-name-safe short name of a corpus source (the prepared corpus's directory)."""
    text = str(source)
    if text.startswith("hf:"):
        name, split = parse_hf_source(text)
        text = f"hf-{Path(name).name}-{split}"
    elif text != "stdlib":
        text = Path(text).name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "corpus"


def split_of(name: str, val_fraction: float = VAL_FRACTION) -> str:
    """``"val"`` or ``"train"`` for a document, from a hash of its name (stable)."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return "val" if h < val_fraction * 2**64 else "train"


def _fingerprint(docs: Sequence[Document], settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for d in docs:
        h.update(d.name.encode() + b"\0" + hashlib.sha256(d.text.encode()).digest())
    return h.hexdigest()


def _tokenizer_sample(docs: Sequence[Document], split: list[str], max_bytes: int) -> list[str]:
    """First train documents up to ``max_bytes`` characters: the tokenizer's training set."""
    out, total = [], 0
    for d, s in zip(docs, split, strict=True):
        if s == "train" and total < max_bytes:
            out.append(d.text)
            total += len(d.text)
    return out


@dataclass(frozen=True)
class PreparedCorpus:
    """A tokenised, sharded corpus on disk (``root/manifest.json`` + shards + tokenizer)."""

    root: Path
    manifest: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.manifest["eot_id"])

    @property
    def tokenizer_sha256(self) -> str | None:
        """sha256 of ``tokenizer.json``: which words the corpus's token ids stand for."""
        return self.manifest.get("tokenizer_sha256")

    def tokenizer(self):
        """The trained ``tokenizers.Tokenizer``."""
        return tk.load_tokenizer(self.root / "tokenizer.json", self.vocab_size)

    def shard_ids(self, split: str) -> list[str]:
        """Content ids of the shards of ``split`` (``train`` or ``val``)."""
        return [s["id"] for s in self.manifest["splits"][split]]

    def documents(self, split: str | None = None) -> list[dict[str, Any]]:
        """Document records ``{id, name, split, shard, n_tokens}``, optionally of one split."""
        docs = self.manifest["documents"]
        return [d for d in docs if split is None or d["split"] == split]

    def dataset(self, split: str, doc_ids: Sequence[int] | None = None) -> DocumentDataset:
        """Load one split (optionally only ``doc_ids``) as a :class:`DocumentDataset`."""
        if split not in self.manifest["splits"]:
            raise DataError(f"unknown split {split!r}: allowed train, val")
        ds = DocumentDataset.from_shards(self.root / "shards", self.shard_ids(split), self.eot_id)
        return ds if doc_ids is None else ds.subset(doc_ids)


def corpus_name(data: PreparedCorpus) -> str:
    """``corpus <source>``, for messages."""
    return f"corpus {data.manifest.get('source') or data.root}"


def prepare_corpus(
    source: str | Path = "stdlib",
    vocab_size: int = 512,
    data_dir: str | Path | None = None,
    max_bytes: int | None = None,
    tokenizer_max_bytes: int | None = None,
    val_fraction: float = VAL_FRACTION,
    shard_tokens: int = SHARD_TOKENS,
) -> PreparedCorpus:
    """Tokenise and shard a corpus, or reuse the cached result.

    Args:
        source: what :func:`load_corpus` takes (``stdlib``, directory, file, ``hf:``).
        vocab_size: tokenizer vocabulary (``cfg.model.vocab_size``).
        data_dir: cache root (default :func:`default_data_dir`).
        max_bytes: use only the first documents up to this many characters.
        tokenizer_max_bytes: train the tokenizer on the first train documents up to this
            many characters (default 2 MB for vocab <= 1024, else 32 MB); the full corpus
            is always tokenised.
        val_fraction: fraction of documents (by name hash) held out for validation.
        shard_tokens: approximate tokens per shard.

    Raises:
        DataError / TokenizerError: unusable corpus or settings.
    """
    docs = load_corpus(source, max_bytes)
    if tokenizer_max_bytes is None:
        tokenizer_max_bytes = 2_000_000 if vocab_size <= 1024 else 32_000_000
    settings = {
        "format": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "tokenizer_max_bytes": tokenizer_max_bytes,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
    }
    fingerprint = _fingerprint(docs, settings)
    root = (
        Path(data_dir or default_data_dir())
        / f"{source_tag(source)}-{fingerprint[:16]}-v{vocab_size}"
    )
    if (root / "manifest.json").exists():
        return PreparedCorpus(root, json.loads((root / "manifest.json").read_text()))
    split = _assign_splits(docs, val_fraction)
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "shards").mkdir(parents=True)
    tok = tk.train_tokenizer(_tokenizer_sample(docs, split, tokenizer_max_bytes), vocab_size)
    tok.save(str(tmp / "tokenizer.json"))
    manifest = _write_shards(tmp / "shards", docs, split, tok, vocab_size, shard_tokens)
    manifest.update(
        source=str(source),
        max_bytes=max_bytes,  # with source, what prepares this corpus again (torchrun ranks)
        fingerprint=fingerprint,
        settings=settings,
        tokenizer_sha256=hashlib.sha256((tmp / "tokenizer.json").read_bytes()).hexdigest(),
    )
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    try:
        tmp.rename(root)
    except OSError:  # another process prepared the same corpus first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedCorpus(root, json.loads((root / "manifest.json").read_text()))


def _assign_splits(docs: Sequence[Document], val_fraction: float) -> list[str]:
    split = [split_of(d.name, val_fraction) for d in docs]
    # Tiny corpora: guarantee both splits are non-empty, deterministically.
    if len(docs) >= 2 and "val" not in split:
        split[
            min(range(len(docs)), key=lambda i: hashlib.sha256(docs[i].name.encode()).digest())
        ] = "val"
    if "train" not in split:
        raise DataError("corpus needs at least 2 documents (one for train, one for val)")
    return split


def _write_shards(out, docs, split, tok, vocab_size, shard_tokens) -> dict[str, Any]:
    encoded = tk.encode_documents(tok, [d.text for d in docs])
    dtype = token_dtype(vocab_size)
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    records: list[dict[str, Any]] = []
    for name in ("train", "val"):
        ids = [i for i, s in enumerate(split) if s == name]
        start = 0
        while start < len(ids):
            end, n = start, 0
            while end < len(ids) and (n == 0 or n + len(encoded[ids[end]]) <= shard_tokens):
                n += len(encoded[ids[end]])
                end += 1
            chunk = ids[start:end]
            cid = write_shard(out, encode_shard(chunk, [encoded[i] for i in chunk], dtype))
            splits[name].append({"id": cid, "n_docs": len(chunk), "n_tokens": n})
            records += [
                {
                    "id": i,
                    "name": docs[i].name,
                    "split": name,
                    "shard": cid,
                    "n_tokens": len(encoded[i]),
                }
                for i in chunk
            ]
            start = end
    records.sort(key=lambda r: r["id"])
    return {
        "format": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eot_id": tk.eot_id(tok),
        "splits": splits,
        "documents": records,
    }


class DocumentDataset:
    """Documents of one split as a token stream with deterministic batch sampling.

    The stream is every document followed by ``<|endoftext|>``, in document-id order.
    Batch ``position`` under ``seed`` draws ``B`` start offsets from
    ``numpy.random.Generator(PCG64([seed, position]))``: no hidden state, so resuming at
    a saved position reproduces the same batches.
    """

    def __init__(self, doc_ids: np.ndarray, docs: list[np.ndarray], eot_id: int):
        order = np.argsort(doc_ids, kind="stable")
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)[order]
        self._docs = [docs[i] for i in order]
        self.eot_id = int(eot_id)
        parts = [p for d in self._docs for p in (d, np.array([eot_id], dtype=d.dtype))]
        self.tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)

    @classmethod
    def from_shards(
        cls, shard_dir: str | Path, shard_ids: Sequence[str], eot_id: int
    ) -> DocumentDataset:
        """Load and verify shards (by content id) from ``shard_dir``."""
        return cls.from_decoded([read_shard(shard_dir, cid) for cid in shard_ids], eot_id)

    @classmethod
    def from_decoded(cls, shards: Sequence[Shard], eot_id: int) -> DocumentDataset:
        """Every document of already decoded (and verified) shards."""
        ids: list[int] = []
        docs: list[np.ndarray] = []
        for shard in shards:
            ids += [int(x) for x in shard.doc_ids]
            docs += [shard.document(i) for i in range(len(shard.doc_ids))]
        return cls(np.array(ids, dtype=np.int64), docs, eot_id)

    def __len__(self) -> int:
        return len(self._docs)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)

    def iter_documents(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(doc_id, tokens)`` for every document, in id order."""
        yield from zip((int(i) for i in self.doc_ids), self._docs, strict=True)

    def subset(self, doc_ids: Sequence[int]) -> DocumentDataset:
        """A dataset of only ``doc_ids`` (e.g. the documents assigned to an expert column).

        Raises:
            DataError: an id is not in this dataset.
        """
        index = {int(d): i for i, d in enumerate(self.doc_ids)}
        missing = [d for d in doc_ids if int(d) not in index]
        if missing:
            raise DataError(f"document ids not in this dataset: {missing[:10]}")
        keep = sorted({index[int(d)] for d in doc_ids})
        return DocumentDataset(self.doc_ids[keep], [self._docs[i] for i in keep], self.eot_id)

    def batch(self, position: int, batch_size: int, seq_len: int, seed: int = 0):
        """Batch number ``position``: int64 tensor ``(batch_size, seq_len + 1)``.

        Raises:
            DataError: the dataset has fewer than ``seq_len + 1`` tokens.
        """
        import torch

        span = seq_len + 1
        if self.n_tokens < span:
            raise DataError(
                f"dataset has {self.n_tokens} tokens, fewer than seq_len + 1 = {span}: "
                "use more documents or a shorter train.seq_len"
            )
        rng = np.random.Generator(np.random.PCG64([int(seed), int(position)]))
        starts = rng.integers(0, self.n_tokens - span + 1, size=batch_size)
        rows = np.stack([self.tokens[s : s + span] for s in starts]).astype(np.int64)
        return torch.from_numpy(rows)
