"""`mlm demo` end to end, with a short pretraining and fewer fine-tunes so it fits the test budget."""

import json
import re

import pytest

import mlm.demo as demo
from mlm.data.corpus import demo_documents
from mlm.data.prepare import is_validation
from mlm.demo import run_demo
from mlm.errors import UserError
from mlm.tokenizer import load_tokenizer


@pytest.fixture
def small_demo(monkeypatch):
    """The demo's own code path with fewer fine-tunes and held-out sequences."""
    monkeypatch.setattr(demo, "LABELS_PER_TOPIC", (5, 20))
    monkeypatch.setattr(demo, "SEEDS", 2)
    monkeypatch.setattr(demo, "FEW_LABEL_STEPS", 4)
    monkeypatch.setattr(demo, "ALL_LABELS_EPOCHS", 1)
    monkeypatch.setattr(demo, "MLM_EVAL_SEQUENCES", 32)
    monkeypatch.setattr(demo, "FILL_MASK_SENTENCES", 3)


@pytest.mark.slow
def test_demo_writes_a_report_of_measured_figures(tmp_path, small_demo):
    out = tmp_path / "demo"
    facts = run_demo(out, steps=30, log=lambda _: None)
    report = (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(facts))
    for png in ("loss_curve.png", "few_labels.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert facts["documents"] == 2225 and facts["held_out_docs"] == 222
    # The held-out articles scored are exactly the prepared validation split: pretraining never saw them.
    tokenizer = load_tokenizer(out / "tokenizer")
    held_out = [text for i, (text, _) in enumerate(demo_documents()) if is_validation(i, demo.VAL_FRACTION)]
    encoded = tokenizer.backend_tokenizer.encode_batch(held_out, add_special_tokens=False)
    assert facts["val_tokens"] == sum(len(e.ids) + 1 for e in encoded)  # + the separator after each
    p = facts["pretraining"]
    assert p["steps"] == 30 and p["last_loss"] < p["first_loss"] and p["tokens_per_s"] > 0
    assert f"30 steps × 32 sequences × {demo.SEQ_LEN} tokens" in report
    mlm = facts["masked_tokens"]
    for name in ("pretrained", "random init", "unigram"):
        assert 0.0 <= mlm[name]["top1"] <= mlm[name]["top5"] <= 1.0
        assert f"{100 * mlm[name]['top1']:.1f}%" in report
    # 30 steps already beat random weights on the held-out masked tokens
    assert mlm["pretrained"]["top5"] > mlm["random init"]["top5"]
    topics = facts["topics"]
    for name in ("pretrained", "random init"):
        assert sorted(topics[name]) == ["20", "5", "all"]
        assert len(topics[name]["5"]) == 2 and all(0.0 <= a <= 1.0 for a in topics[name]["5"])
    for rows in facts["fill_mask"].values():
        assert len(rows) == 3 and all(1 <= r["rank"] <= r["vocabulary"] and len(r["top5"]) == 5 for r in rows)
    # Running it again replaces the demo's own folder.
    run_demo(out, steps=2, log=lambda _: None)
    assert "2 steps" in (out / "report.md").read_text()


@pytest.mark.slow
def test_demo_fits_pretraining_into_the_time_its_budget_leaves(tmp_path, small_demo):
    out = tmp_path / "demo"
    facts = run_demo(out, minutes=2.0, log=lambda _: None)
    p = facts["pretraining"]
    assert re.fullmatch(r"\d+s", p["budget"]) and p["steps"] > 1
    recorded = json.loads((out / "run" / "config.json").read_text())["train"]
    assert recorded["budget"] == p["budget"] and recorded["steps"] == p["steps"]


def test_demo_never_replaces_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a demo folder"):
        run_demo(tmp_path, steps=2, log=lambda _: None)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_bad_minutes_are_one_line(tmp_path):
    with pytest.raises(UserError, match="--minutes must be a positive number"):
        run_demo(tmp_path / "demo", minutes=0, log=lambda _: None)


@pytest.mark.slow
def test_a_demo_stopped_by_sigterm_says_where_and_keeps_what_it_measured(tmp_path):
    import os
    import signal

    out, lines = tmp_path / "demo", []

    def log(line):
        lines.append(line)
        if line.startswith("[3/6]"):  # a real SIGTERM, as a scheduler sends it, once the data is prepared
            os.kill(os.getpid(), signal.SIGTERM)

    def unhandled(signum, frame):  # without the demo's own handling the test fails here, not by killing pytest
        raise AssertionError("the demo let SIGTERM through")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        facts = run_demo(out, steps=2, log=log)
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the demo's handler only while it runs
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert facts["stopped_by"] == "SIGTERM" and facts["stopped_during"] == "[3/6] scoring the random initialisation"
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(facts))
    assert facts["vocab_size"] > 0 and facts["train_tokens"] > 0 and facts["documents"] == 2225
    assert lines[-1] == (f"stopped by SIGTERM during [3/6] scoring the random initialisation: what was measured "
                         f"before is in {out / 'report.json'} (documents, vocab_size, seconds, train_tokens, "
                         "val_tokens); run mlm demo again for the whole report")


@pytest.mark.slow
def test_the_demo_trains_another_family(tmp_path, small_demo):
    """--family modernbert: the same chain and measures with a tiny ModernBERT and its own tokenizer."""
    facts = run_demo(tmp_path / "demo", steps=4, log=lambda _: None, family="modernbert")
    assert facts["recipe"]["model"] == "modernbert-tiny"
    assert load_tokenizer(tmp_path / "demo" / "tokenizer").cls_token == "[CLS]"
    assert 0.0 <= facts["masked_tokens"]["pretrained"]["top1"] <= 1.0
    with pytest.raises(UserError, match="--family: unknown family 'gpt'"):
        run_demo(tmp_path / "other", steps=2, log=lambda _: None, family="gpt")
