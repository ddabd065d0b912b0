"""Small words a user reads: what a number means, and its plural."""

from mlm.tokenizer import build_tokenizer
from mlm.train.pretrain import pretrain

from conftest import tiny_config


def test_a_tokenizer_smaller_than_asked_says_the_corpus_supports_no_more(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(f"the cat sat on mat number {i % 7}" for i in range(200)) + "\n")
    lines = []
    tokenizer = build_tokenizer(tmp_path / "tok", [str(tmp_path / "c.txt")], "roberta", vocab_size=4000,
                                log=lines.append)
    assert len(tokenizer) < 4000
    assert lines[-1] == (f"note: 4,000 tokens were asked; this corpus supports no more than {len(tokenizer):,} at "
                         "--min-frequency 2 (a larger corpus, or a lower --min-frequency, gives more)")


def test_one_step_is_one_step(data_dirs, tmp_path):
    lines = []
    pretrain(tiny_config(data_dirs["roberta"], tmp_path / "run", steps=1), log=lines.append)
    assert any(line.startswith("data: ") and "; 1 step = " in line for line in lines)
    assert lines[-1].startswith("finished 1 step in ")
