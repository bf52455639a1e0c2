"""Stage 7: evaluation report, task scoring, lm-eval adapter core."""

from __future__ import annotations

import json

import pytest
import torch

from coordinator.central.checkpoint import save_checkpoint
from coordinator.central.evaluation import lm as lm_mod
from coordinator.central.evaluation.lm import EvalError, PerspectiveLM
from coordinator.central.evaluation.report import default_tasks, run_eval
from coordinator.central.evaluation.tasks import extract_number, read_jsonl, run_multiple_choice
from shared_model.config_loading import load_config
from shared_model.data import prepare_corpus
from shared_model.model import PerspectiveModel

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny", overrides=["train.eval_batches=2", "train.seq_len=32"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare_corpus("stdlib", 512, tmp_path_factory.mktemp("data"), max_bytes=600_000)


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return PerspectiveModel(cfg, moe=True).eval()


@pytest.fixture(scope="module")
def report(cfg, corpus, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    path = out / "stage4.safetensors"
    save_checkpoint(path, model, cfg, stage=4, step=0)
    params = {"vocab_size": 1000, "anchors": 100, "halfspaces": 100}
    return out, run_eval(
        path, out / "r", data=corpus, device="cpu", gen_tokens=16, spp_params=params
    )


def test_report_has_every_section(report, model, corpus):
    out, rep = report
    for key in ("perplexity", "tasks", "system", "safety", "not_defined", "targets"):
        assert key in rep
    assert rep["perplexity"]["val_ppl"] > 1
    assert set(rep["tasks"]) == {"arc_mini", "gsm_mini"}
    # The report's task scores are the task runners' scores on the shipped files.
    arc = run_multiple_choice(PerspectiveLM(model, corpus.tokenizer()), _task("arc_mini"))
    assert rep["tasks"]["arc_mini"]["acc"] == arc["acc"] and arc["n"] == 10
    gsm = rep["tasks"]["gsm_mini"]
    assert gsm["n"] == len(read_jsonl(_task("gsm_mini"), ("question", "answer")))
    assert (gsm["exact_match"] * gsm["n"]) == pytest.approx(round(gsm["exact_match"] * gsm["n"]))
    assert rep["system"]["generation_tokens_per_s"] > 0 and rep["system"]["peak_rss_mb"] > 0
    assert "not measured" in rep["system"]["peak_vram_mb"]
    assert rep["not_defined"]["mpd_ece"].startswith("not defined")
    statuses = {r["metric"]: r["status"] for r in rep["targets"]}
    red, benign = rep["safety"]["redteam_block_rate"], rep["safety"]["benign_false_block_rate"]
    assert statuses["safety.redteam_block_rate"] == ("pass" if red >= 0.98 else "fail")
    # An untrained model cannot tell red-team from benign prompts: its polytope blocks the
    # benign ones too, and the report must say so rather than "pass" on the red-team rate.
    assert benign > 0.10 and statuses["safety.benign_false_block_rate"] == "fail"
    assert statuses["perplexity.val_ppl"] == "no target"
    md = (out / "r" / "report.md").read_text()
    for title in (
        "## Perplexity",
        "## Tasks",
        "## System",
        "## Safety",
        "## Not defined",
        "## Targets",
    ):
        assert title in md
    assert json.loads((out / "r" / "report.json").read_text())["stage"] == 4


def _task(name: str):
    (path,) = [p for p in default_tasks() if p.stem == name]
    return path


def test_loglikelihood_matches_the_model(model, corpus):
    lm = PerspectiveLM(model, corpus.tokenizer(), eot_id=corpus.eot_id)
    ctx, cont = "def f(x):", " return x"
    ((ll, _),) = lm.loglikelihood([(ctx, cont)])
    a, b = lm.encode(ctx), lm.encode(cont)
    with torch.no_grad():
        logits = model(torch.tensor([a + b[:-1]])).logits[0].log_softmax(-1)
    want = sum(float(logits[len(a) - 1 + i, t]) for i, t in enumerate(b))
    assert ll == pytest.approx(want, rel=1e-5)
    # rolling log-likelihood of a short text equals the loglikelihood after the EOT token
    (roll,) = lm.loglikelihood_rolling([("import os",)])
    eot = corpus.tokenizer().id_to_token(corpus.eot_id)
    ((ll2, _),) = lm.loglikelihood([(eot, "import os")])
    assert roll == pytest.approx(ll2, rel=1e-5)


def test_generate_until_stops_at_the_stop_string(model, corpus):
    lm = PerspectiveLM(model, corpus.tokenizer(), eot_id=corpus.eot_id)
    (free,) = lm.generate_until([("x = ", {"max_gen_toks": 12})])
    assert free
    stop = free[len(free) // 2]
    (cut,) = lm.generate_until([("x = ", {"until": [stop], "max_gen_toks": 12})])
    assert stop not in cut and free.startswith(cut)


def test_mc_task_picks_the_choice_the_model_scores_highest(model, corpus, tmp_path):
    """40 four-way items (chance 0.25): marking the model's own argmax as the answer must
    give accuracy 1, marking its argmin must give 0, so neither can pass by chance."""
    from coordinator.central.evaluation.tasks import _prompt

    lm = PerspectiveLM(model, corpus.tokenizer())
    words = ["alpha", "beta", "gamma", "delta", "return", "import", "class", "lambda"]
    rows = []
    for i in range(40):
        choices = [words[(i + k * 3) % len(words)] + str(k) for k in range(4)]
        lls = [ll for ll, _ in lm.loglikelihood([(_prompt(f"q{i} x ="), " " + c) for c in choices])]
        rows.append((f"q{i} x =", choices, lls))
    for pick, want in ((max, 1.0), (min, 0.0)):
        path = tmp_path / f"{pick.__name__}.jsonl"
        with path.open("w") as fh:
            for q, choices, lls in rows:
                answer = pick(range(4), key=lls.__getitem__)
                fh.write(json.dumps({"question": q, "choices": choices, "answer": answer}) + "\n")
        res = run_multiple_choice(lm, path)
        assert res["n"] == 40 and res["acc"] == want and res["chance"] == 0.25


def test_task_files_are_validated(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(EvalError, match="missing keys"):
        read_jsonl(bad, ("question", "answer"))
    assert extract_number("so 1,234 apples and then 42.") == "42"
    assert extract_number("none") is None


def test_lm_eval_adapter_is_guarded(model, corpus):
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(EvalError, match="pip install lm-eval"):
            lm_mod.lm_eval_adapter(model, corpus.tokenizer())
    else:
        adapter = lm_mod.lm_eval_adapter(model, corpus.tokenizer())
        assert adapter.loglikelihood([("a", " b")])[0][0] < 0
