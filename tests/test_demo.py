"""`mlm demo` end to end, with a short pretraining so it fits the test budget."""

import re

import pytest

from mlm.demo import run_demo
from mlm.errors import UserError


@pytest.mark.slow
def test_demo_writes_a_report_of_measured_figures(tmp_path):
    out = tmp_path / "demo"
    facts = run_demo(out, steps=30, log=lambda _: None)
    report = (out / "report.md").read_text()
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert facts["documents"] == 2225 and facts["held_out_docs"] == 222
    assert facts["last_loss"] < facts["first_loss"]
    for name in ("pretrained", "random init"):
        accuracy = facts["topics"][name]["accuracy"]
        assert 0.0 <= accuracy <= 1.0
        assert f"{accuracy:.1%}" in report
    assert len(facts["fill_mask"]) == 5 and all(len(r["top5"]) == 5 for r in facts["fill_mask"])
    assert re.search(r"30 steps × 32 sequences", report)
    # Running it again replaces the demo's own folder.
    run_demo(out, steps=2, log=lambda _: None)
    assert "2 steps" in (out / "report.md").read_text()


def test_demo_never_replaces_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a demo folder"):
        run_demo(tmp_path, steps=2, log=lambda _: None)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
