"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``), trained deterministically.

Byte-level BPE can encode any UTF-8 text (no unknown tokens), so the same tokenizer
works for the standard-library demo corpus and for user corpora. The trained
tokenizer is saved as ``tokenizer.json`` and identified by the sha256 of that file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"


class TokenizerError(ValueError):
    """The tokenizer cannot be trained or loaded; the message says why and what to do."""


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with exactly ``vocab_size`` entries.

    Training is deterministic for a given ordered sequence of texts (BPE merges are
    chosen by count with a fixed tie-break), which the tests check.

    Args:
        texts: training documents, in a fixed order.
        vocab_size: final vocabulary size (256 bytes + 1 special token + merges).

    Raises:
        TokenizerError: vocab too small for the byte alphabet, or the corpus too small to
            reach ``vocab_size`` merges.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
            f"{len(alphabet) + 1} (256 bytes + {EOT}); raise model.vocab_size"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise TokenizerError(
            f"the corpus only supports {tok.get_vocab_size()} tokens, fewer than "
            f"vocab_size={vocab_size}; use a larger corpus or a smaller model.vocab_size"
        )
    return tok


def load_tokenizer(path: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """Load ``tokenizer.json`` and optionally check its vocabulary size.

    Raises:
        TokenizerError: file missing/corrupt, or vocabulary size differs from the config.
    """
    path = Path(path)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise TokenizerError(f"cannot load tokenizer {path}: {exc}; delete it to retrain") from exc
    if vocab_size is not None and tok.get_vocab_size() != vocab_size:
        raise TokenizerError(
            f"tokenizer {path} has {tok.get_vocab_size()} tokens but the config says "
            f"model.vocab_size={vocab_size}; use the matching tokenizer or retrain"
        )
    return tok


def eot_id(tok: Tokenizer) -> int:
    """Id of the end-of-text token that separates documents."""
    idx = tok.token_to_id(EOT)
    if idx is None:
        raise TokenizerError(f"tokenizer has no {EOT} token; retrain it with train_tokenizer")
    return idx


def encode_documents(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Encode documents (batched, multi-threaded inside ``tokenizers``; order kept)."""
    return [enc.ids for enc in tok.encode_batch(list(texts), add_special_tokens=False)]
