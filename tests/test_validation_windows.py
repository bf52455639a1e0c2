"""The benchmark's fixed validation windows (``benchmarks.federation_bench.eval_windows``)."""

import numpy as np

from benchmarks.federation_bench import eval_windows
from shared_model.data import DocumentDataset

SEQ = 8


def _dataset() -> DocumentDataset:
    """One long document (~1000 windows of SEQ + 1 tokens) and nine short ones (5 each)."""
    rng = np.random.default_rng(0)
    sizes = [1000 * (SEQ + 1) + 3] + [5 * (SEQ + 1) + 2] * 9
    docs = [rng.integers(0, 500, size=n).astype(np.uint16) for n in sizes]
    return DocumentDataset(np.arange(len(docs)), docs, eot_id=511)


def _check_slices(val: DocumentDataset, windows) -> None:
    docs = [np.asarray(d, dtype=np.int64) for _, d in val.iter_documents()]
    for row, owner in zip(windows[0].numpy(), windows[1], strict=True):
        doc = docs[owner]
        starts = range(0, len(doc) - SEQ - 1, SEQ + 1)
        assert any(np.array_equal(doc[s : s + SEQ + 1], row) for s in starts)


def test_uniform_windows_weigh_a_document_by_its_length():
    val = _dataset()
    windows = eval_windows(val, SEQ, 40 * SEQ)
    assert len(windows[1]) == 40
    assert np.mean(windows[1] == 0) > 0.8  # the long document: 1000 of 1045 windows
    _check_slices(val, windows)


def test_per_document_windows_weigh_documents_alike_and_repeat():
    val = _dataset()
    windows = eval_windows(val, SEQ, 40 * SEQ, per_document=True)
    assert np.bincount(windows[1], minlength=10).tolist() == [4] * 10
    _check_slices(val, windows)
    again = eval_windows(val, SEQ, 40 * SEQ, per_document=True)
    assert np.array_equal(again[0].numpy(), windows[0].numpy())
    # more windows than the short documents hold: they give all theirs, the long one the rest
    many = eval_windows(val, SEQ, 100 * SEQ, per_document=True)
    assert np.bincount(many[1], minlength=10).tolist() == [55] + [5] * 9
