"""Benchmark data preparation: the run_mlm.py path (datasets text → map(tokenize, num_proc=W) →
map(group_texts, num_proc=W)) against `mlm prepare --workers W`, on the same corpus, tokenizer and cores.

Prints tokens/s, peak memory of the whole process tree (workers included; PSS, so pages shared between
processes count once), disk bytes per token, and our parallel efficiency against W × the single-core rate
of the tokenizer alone (encode_batch in one process).

    python scripts/bench_prepare.py                          # ~100 MB made from the demo corpus, 32k BPE
    python scripts/bench_prepare.py --corpus wiki.txt --tokenizer tok/roberta --workers 8 --repeat 2

Each measurement runs in its own process; with --repeat N the best of N runs is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent


# ---- measured in child processes -------------------------------------------------------------------------
def cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have ended (pool workers included)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def tokenizer_alone(tokenizer_dir: str, corpus: str, sample_mb: float) -> dict:
    """Single-core rate of the Rust tokenizer on the first `sample_mb` MB, in 512-line batches."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    lines, size = [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                lines.append(line.strip())
                size += len(line.encode())
            if size >= sample_mb * 1e6:
                break
    start, cpu = time.perf_counter(), cpu_seconds()
    tokens = 0
    # The call prepare's workers make (encode_batch_fast: no character offsets), where tokenizers has it.
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
    for i in range(0, len(lines), 512):
        tokens += sum(len(e.ids) for e in encode_batch(lines[i : i + 512], add_special_tokens=False))
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "cpu": cpu_seconds() - cpu}


def tokenizer_alone_on_every_worker(tokenizer_dir: str, corpus: str, sample_mb: float, workers: int) -> dict:
    """The same measurement in `workers` processes at once: what W cores give the tokenizer alone (cores that
    share caches, memory bandwidth and a power budget rarely give W × one core)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        runs = pool.starmap(tokenizer_alone, [(tokenizer_dir, corpus, sample_mb)] * workers)
    seconds = max(r["seconds"] for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "cpu": sum(r["cpu"] for r in runs)}


def run_mlm_path(tokenizer_dir: str, corpus: str, workers: int, cache_dir: str) -> dict:
    """What run_mlm.py does without --line_by_line: tokenize every line, then concatenate into 512-token blocks."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    start, cpu = time.perf_counter(), cpu_seconds()
    raw = datasets.load_dataset("text", data_files={"train": corpus}, cache_dir=cache_dir)["train"]

    def tokenize(examples):
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    tokenized = raw.map(tokenize, batched=True, num_proc=workers, remove_columns=["text"])
    block = 512

    def group_texts(examples):
        concatenated = {k: sum(examples[k], []) for k in examples}
        total = (len(concatenated["input_ids"]) // block) * block
        return {k: [t[i : i + block] for i in range(0, total, block)] for k, t in concatenated.items()}

    grouped = tokenized.map(group_texts, batched=True, num_proc=workers)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    tokens = sum(len(ids) for batch in tokenized.iter(batch_size=10_000) for ids in batch["input_ids"])
    disk = sum(p.stat().st_size for p in Path(cache_dir).rglob("*.arrow"))
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "disk_bytes": disk,
            "grouped_sequences": len(grouped), "cpu": cpu}


def mlm_prepare_path(tokenizer_dir: str, corpus: str, workers: int, out: str) -> dict:
    """`mlm prepare`, timed like the run_mlm.py path: from after the imports to the finished manifest."""
    sys.path.insert(0, str(HERE.parent / "src"))
    from transformers import AutoTokenizer  # imported before the clock starts, as in run_mlm_path

    from mlm.data.prepare import PrepareConfig, prepare

    AutoTokenizer.from_pretrained(tokenizer_dir)
    start, cpu = time.perf_counter(), cpu_seconds()
    manifest = prepare(PrepareConfig([corpus], tokenizer_dir, out, workers=workers, progress=False), log=lambda _: None)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    disk = sum(p.stat().st_size for p in Path(out).rglob("*.bin"))
    return {"tokens": tokens, "documents": manifest["documents"], "seconds": seconds, "tokens_per_s": tokens / seconds,
            "disk_bytes": disk, "cpu": cpu}


# ---- the parent: runs each measurement in a child and watches its process tree's memory ------------------
def tree_memory(process: psutil.Process) -> int:
    """PSS (or RSS where PSS is not available) of a process and all its descendants, in bytes."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def measure(kind: str, args: list) -> dict:
    """Run `bench_prepare.py --child KIND ARGS…` and sample its process tree's memory every 0.1 s."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        child = subprocess.Popen([sys.executable, __file__, "--child", kind, result.name, json.dumps(args)])
        process = psutil.Process(child.pid)
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                try:
                    peak = max(peak, tree_memory(process))
                except psutil.NoSuchProcess:
                    break
                time.sleep(0.1)

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        if child.wait() != 0:
            sys.exit(f"error: the {kind} measurement failed")
        done.set()
        watcher.join()
        out = json.loads(Path(result.name).read_text())
    out["peak_bytes"] = peak
    return out


def make_corpus(path: Path, megabytes: float) -> None:
    """Paragraphs of the demo corpus (BBC News), one per line, in a new random order per pass, up to the size."""
    sys.path.insert(0, str(HERE.parent / "src"))
    from mlm.data.corpus import demo_documents

    paragraphs = [p.strip() for text, _ in demo_documents() for p in text.split("\n") if p.strip()]
    rng = random.Random(0)
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            rng.shuffle(paragraphs)
            for p in paragraphs:
                f.write(p + "\n")
                size += len(p.encode()) + 1
                if size >= megabytes * 1e6:
                    break


def make_tokenizer(path: Path, vocab_size: int) -> None:
    sys.path.insert(0, str(HERE.parent / "src"))
    from mlm.data.corpus import demo_documents
    from mlm.tokenizer import train_tokenizer

    train_tokenizer([text for text, _ in demo_documents()], "roberta", vocab_size, path)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, result, arguments = sys.argv[2:]
        functions = {"tokenizer": tokenizer_alone, "tokenizer_w": tokenizer_alone_on_every_worker,
                     "run_mlm": run_mlm_path, "mlm": mlm_prepare_path}
        Path(result).write_text(json.dumps(functions[kind](*json.loads(arguments))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", help="a .txt corpus, one document per line (default: made from the demo corpus)")
    parser.add_argument("--mb", type=float, default=100, help="size of the corpus made when --corpus is not given")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: a byte-level BPE trained on the demo corpus)")
    parser.add_argument("--vocab-size", type=int, default=32_000, help="vocabulary of the tokenizer trained by default")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes for both paths")
    parser.add_argument("--sample-mb", type=float, default=20, help="text the single-core tokenizer rate is measured on")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement; the best is reported")
    parser.add_argument("--work-dir", help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--skip-run-mlm", action="store_true", help="measure only mlm prepare and the tokenizer alone")
    parser.add_argument("--skip-one-worker", action="store_true", help="leave out mlm prepare --workers 1 (for big corpora)")
    args = parser.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_prepare_"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = Path(args.corpus) if args.corpus else work / "corpus.txt"
    if not args.corpus and not corpus.is_file():
        make_corpus(corpus, args.mb)
    tokenizer = Path(args.tokenizer) if args.tokenizer else work / "tokenizer"
    if not args.tokenizer and not tokenizer.is_dir():
        make_tokenizer(tokenizer, args.vocab_size)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer)))
    mb = corpus.stat().st_size / 1e6
    print(f"corpus {corpus} ({mb:,.1f} MB), tokenizer {tokenizer} ({vocab:,} tokens), {args.workers} worker(s), "
          f"{os.cpu_count()} CPU(s), best of {args.repeat}")

    def best(kind: str, make_args) -> dict:
        runs = []
        for _ in range(args.repeat):
            runs.append(measure(kind, make_args()))
        return max(runs, key=lambda r: r["tokens_per_s"])

    def fresh(name: str) -> str:
        shutil.rmtree(work / name, ignore_errors=True)
        return str(work / name)

    single = best("tokenizer", lambda: [str(tokenizer), str(corpus), args.sample_mb])
    together = best("tokenizer_w", lambda: [str(tokenizer), str(corpus), args.sample_mb, args.workers])
    ours_1 = None if args.skip_one_worker else best("mlm", lambda: [str(tokenizer), str(corpus), 1, fresh("mlm-1")])
    ours = best("mlm", lambda: [str(tokenizer), str(corpus), args.workers, fresh("mlm")])
    theirs = None if args.skip_run_mlm else best("run_mlm", lambda: [str(tokenizer), str(corpus), args.workers, fresh("hf-cache")])

    print("\npeak MB: PSS of the process tree; disk: everything the path leaves (run_mlm: datasets' cache files)")
    print(f"{'path':<34}{'tokens':>14}{'seconds':>9}{'tokens/s':>12}{'CPU s':>8}{'peak MB':>9}{'disk B/token':>14}")
    rows = [
        ("tokenizer alone, 1 core", single, None),
        (f"tokenizer alone, {args.workers} at once", together, None),
        *([(f"run_mlm.py datasets path, W={args.workers}", theirs, theirs["disk_bytes"])] if theirs else []),
        *([("mlm prepare --workers 1", ours_1, ours_1["disk_bytes"])] if ours_1 else []),
        (f"mlm prepare --workers {args.workers}", ours, ours["disk_bytes"]),
    ]
    for name, r, disk in rows:
        per_token = f"{disk / r['tokens']:.2f}" if disk else "-"
        print(f"{name:<34}{r['tokens']:>14,}{r['seconds']:>9.1f}{r['tokens_per_s']:>12,.0f}{r['cpu']:>8.1f}"
              f"{r['peak_bytes'] / 2**20:>9,.0f}{per_token:>14}")
    # The tokenizer alone counts no separators: compare like with like.
    text_rate = (ours["tokens"] - ours["documents"]) / ours["seconds"]
    efficiency = text_rate / (args.workers * single["tokens_per_s"])
    print(f"\nparallel efficiency: {text_rate:,.0f} text tokens/s / ({args.workers} × {single['tokens_per_s']:,.0f}) = "
          f"{100 * efficiency:.0f}% of W × the single-core tokenizer rate"
          + (f" (1 worker: {100 * (ours_1['tokens'] - ours_1['documents']) / ours_1['seconds'] / single['tokens_per_s']:.0f}%)"
             if ours_1 else ""))
    print(f"the tokenizer alone in {args.workers} processes at once: {together['tokens_per_s']:,.0f} tokens/s = "
          f"{100 * together['tokens_per_s'] / (args.workers * single['tokens_per_s']):.0f}% of W × one core "
          f"(the cores' own ceiling); mlm prepare reaches {100 * text_rate / together['tokens_per_s']:.0f}% of it")
    # On a machine shared with other jobs the workers get less than W cores: the CPU time tells both apart.
    work = (ours["tokens"] - ours["documents"]) / ours["cpu"] / (single["tokens"] / single["cpu"])
    print(f"work efficiency: {100 * work:.0f}% (text tokens per CPU-second of the whole process tree vs the tokenizer "
          f"alone); CPU received: {ours['cpu']:.1f} CPU-s in {ours['seconds']:.1f}s = "
          f"{100 * ours['cpu'] / ours['seconds'] / args.workers:.0f}% of {args.workers} cores")
    if theirs is not None:
        print(f"mlm prepare vs run_mlm.py path: {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}× the tokens/s, "
              f"{ours['peak_bytes'] / max(theirs['peak_bytes'], 1):.2f}× the peak memory, "
              f"{ours['disk_bytes'] / ours['tokens']:.2f} vs {theirs['disk_bytes'] / theirs['tokens']:.2f} bytes/token on disk")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
