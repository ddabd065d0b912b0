"""Command line: parse arguments and call one function per subcommand. No logic lives here."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import time
import typing
from pathlib import Path

from mlm.config import settings_help
from mlm.errors import UserError


# ---- tokenizer, prepare, pretrain, demo ------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, saying a usage mistake the way every other error is said: one line, exit 2; a flag must be
    spelled whole (argparse would take --vocab for --vocab-size)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> typing.NoReturn:
        _fail(f"{message} (see {self.prog} --help)", 2)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where it tells something: not None (the help text says what happens then), not the True
    of a --no-X flag."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action, argparse._StoreFalseAction):
            return action.help
        return super()._get_help_string(action)


def _unit_bytes(megabytes: float) -> int:
    if not math.isfinite(megabytes) or megabytes > 2**20:  # a work unit over a TiB is a typo
        raise UserError(f"--unit-mb must be a number of MiB (0: automatic), got {megabytes}")
    return int(megabytes * 2**20)


def _add_tokenizer(subparsers) -> None:
    p = subparsers.add_parser(
        "tokenizer", help="train a tokenizer on a corpus, or copy an existing one",
        description="Train a byte-level BPE (RoBERTa) or uncased WordPiece (BERT) tokenizer on a corpus, or copy "
        "an existing one (--from), into a folder that AutoTokenizer.from_pretrained loads.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--corpus", nargs="+", default=[], help="files, folders, globs, hf:NAME[:CONFIG], or demo")
    p.add_argument("--family", default="roberta", help="roberta (byte-level BPE, <s> … </s>), bert (uncased WordPiece) or modernbert (byte-level BPE, [CLS] … [SEP])")
    p.add_argument("--vocab-size", type=int, default=32_000, help="tokens in the vocabulary, special tokens included")
    p.add_argument("--min-frequency", type=int, default=2, help="ignore merges / words seen fewer times than this")
    p.add_argument("--text-field", default="text", help="field of .jsonl/.parquet/hub records holding the text")
    p.add_argument("--document-per-file", action="store_true",
                   help="each .txt file is one document (a book, an article); default: one document per line")
    p.add_argument("--model-max-length", type=int, default=512,
                   help="tokens that truncation=True keeps: the positions of the model the tokenizer is for "
                   "(a checkpoint's tokenizer always carries its own model's)")
    p.add_argument("--from", dest="from_name", default="", help="copy this tokenizer (hub name or directory) instead")
    p.add_argument("--out", required=True, help="tokenizer directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer folder")
    p.set_defaults(func=_run_tokenizer)


def _run_tokenizer(args: argparse.Namespace) -> None:
    from mlm.tokenizer import build_tokenizer

    build_tokenizer(args.out, args.corpus, args.family, args.vocab_size, args.min_frequency, args.text_field,
                    args.from_name, document_per_file=args.document_per_file, model_max_length=args.model_max_length,
                    overwrite=args.overwrite)


def _add_prepare(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="tokenize a corpus into memory-mapped token shards",
        description="Tokenize a corpus once, in parallel, into memory-mapped token shards (train + validation) "
        "and manifest.json; mlm pretrain reads them and cuts sequences of any length. A killed run continues "
        "where it stopped when started again with the same arguments; --num-shards/--shard-index split the work "
        "across machines.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--corpus", nargs="+", default=None,
                   help="files, folders, globs (.txt, .jsonl, also .gz/.zst; .parquet), a save_to_disk folder, "
                   "hf:NAME[:CONFIG], or demo")
    p.add_argument("--tokenizer", help="tokenizer directory or hub name")
    p.add_argument("--out", help="data directory to write")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out for validation")
    p.add_argument("--workers", type=int, default=None, help="processes reading and tokenizing (default: the cores)")
    p.add_argument("--text-field", default="text", help="field of .jsonl/.parquet/dataset records holding the text")
    p.add_argument("--hf-split", default="train", help="split of a hub dataset (or of a saved DatasetDict)")
    p.add_argument("--document-per-file", action="store_true",
                   help="each .txt file is one document (a book, an article); default: one document per line")
    p.add_argument("--unit-mb", type=float, default=0,
                   help="input MiB per work unit, the grain of parallel work and resumption (0: the corpus size / 256, "
                   "between 1 and 64)")
    p.add_argument("--num-shards", type=int, default=1, help="split the work units into this many shares (machines)")
    p.add_argument("--shard-index", type=int, default=0, help="the share this run prepares (0 .. num-shards - 1)")
    p.add_argument("--max-documents", type=int, default=0, help="only the first N documents (a quick sample); 0: all")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate documents (by hash) within each work unit")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or progress lines")
    p.add_argument("--finalize", metavar="DIR", help="check that every share of DIR is done and write its manifest")
    p.add_argument("--overwrite", action="store_true", help="replace a data directory made with other settings or input")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> None:
    from mlm.data.prepare import PrepareConfig, finalize, prepare

    if args.finalize:
        if args.corpus or args.tokenizer or args.out:  # finalize would ignore them: say so rather than do it
            raise UserError("--finalize DIR takes no --corpus, --tokenizer or --out: it finishes what the shares "
                            "of DIR prepared")
        finalize(args.finalize)
        return
    missing = [name for name, value in (("--corpus", args.corpus), ("--tokenizer", args.tokenizer), ("--out", args.out))
               if not value]
    if missing:
        raise UserError(f"mlm prepare needs {', '.join(missing)} (or --finalize DIR)")
    options = {"workers": args.workers} if args.workers is not None else {}
    cfg = PrepareConfig(
        sources=args.corpus,
        tokenizer=args.tokenizer,
        out_dir=args.out,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        hf_split=args.hf_split,
        overwrite=args.overwrite,
        document_per_file=args.document_per_file,
        unit_bytes=_unit_bytes(args.unit_mb),
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        max_documents=args.max_documents,
        dedup=args.dedup,
        progress=args.progress,
        **options,
    )
    prepare(cfg)


def _add_pretrain(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain a masked language model",
        description="Pretrain from a TOML recipe; any setting below can be overridden as --section.key=value.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=settings_help(),
    )
    p.add_argument("config", nargs="?", help="TOML recipe (e.g. configs/roberta-medium.toml); defaults if omitted")
    p.add_argument(
        "--resume", nargs="?", const="latest", default=None,
        help="continue from the newest checkpoint of run.out_dir, or from the given checkpoint / run folder; "
        "--resume=auto starts afresh when there is no checkpoint yet (for requeued jobs)",
    )
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> None:
    from transformers.utils import logging as hf_logging

    from mlm.config import load_config
    from mlm.train.pretrain import pretrain

    hf_logging.disable_progress_bar()  # a resume's "Loading weights" bars would come before an error line on stderr

    summary = pretrain(load_config(args.config, args.overrides), resume=args.resume)
    if summary["stopped_by"]:  # checkpointed after a signal: SLURM's requeue expects 0, Ctrl-C's convention 130
        sys.exit(130 if summary["stopped_by"] == "SIGINT" else 0)


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the whole chain on the embedded BBC News corpus, offline, on CPU",
        description="Tokenizer, prepare, pretrain a tiny RoBERTa for the time the budget leaves, then score it "
        "against its random initialisation (masked-token accuracy beside a unigram baseline, fill-mask, topic "
        "classification with few labels) on the BBC News corpus shipped with the package, offline, on CPU; "
        "writes report.md and report.json.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", help="demo folder (tokenizer, data, run, report)")
    p.add_argument("--minutes", type=float, default=None,
                   help="budget of the whole demo; pretraining gets what the rest leaves (default: 9)")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps instead of the time the budget leaves")
    p.add_argument("--family", default="roberta", help="the tiny model's family (roberta, bert or modernbert)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    import signal

    from mlm.demo import run_demo

    facts = run_demo(args.out, minutes=args.minutes, steps=args.steps, family=args.family)
    if facts.get("stopped_by"):  # stopped by a signal, what was measured kept: the shell's 128 + signal number
        sys.exit(128 + signal.Signals[facts["stopped_by"]].value)


# ---- end tokenizer, prepare, pretrain, demo --------------------------------------------------


# ---- bench -----------------------------------------------------------------------------------
def _add_bench(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time training steps: tokens/s, step time, peak memory, MFU (--baseline: vs the HF path)",
        description="Time real training steps of a recipe (after warm-up and compilation) and print tokens/s, step "
        "time, peak memory and MFU; --baseline also times the reference's Hugging Face path on the same batches. "
        "Any setting can be overridden as --section.key=value, as for mlm pretrain.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("config", help="TOML recipe (e.g. configs/roberta-medium.toml)")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator growth)")
    p.add_argument("--baseline", action="store_true", help="also time the HF path (eager attention, head on every "
                   "position, torch AdamW, micro-batch 16) on the same batches, and print the ratio")
    p.add_argument("--synthetic", action="store_true", help="random tokens with the reference tokenizer's vocabulary "
                   "instead of data.data_dir")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak for the MFU "
                   "(none: from the table of known cards)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object, last")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> None:
    from mlm.bench import bench
    from mlm.config import load_config

    result = bench(load_config(args.config, args.overrides), steps=args.steps, warmup=args.warmup,
                   baseline=args.baseline, synthetic=args.synthetic, peak_tflops=args.peak_tflops)
    if args.json:
        print(json.dumps(result))


# ---- end bench -------------------------------------------------------------------------------


# ---- glue ------------------------------------------------------------------------------------
def _add_glue(subparsers) -> None:
    p = subparsers.add_parser(
        "glue", help="fine-tune and evaluate checkpoints on GLUE",
        description="Fine-tune and score a Hugging Face BERT/RoBERTa/ModernBERT checkpoint (--model) or every checkpoint "
        "of a pretraining run (--run) on GLUE; writes per-task JSON, results.md / results.csv, and a curve.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="checkpoint folder or hub name")
    which.add_argument("--run", help="pretraining run folder holding checkpoint-<step>/ folders")
    p.add_argument("--steps", help="with --run: only these steps, e.g. 1000,2000")
    p.add_argument("--tasks", help="all (default) or a comma list: cola,sst2,mrpc,stsb,qqp,mnli,qnli,rte,wnli")
    p.add_argument("--task-file", action="append", default=[], help="a task of your own (TOML/JSON); repeatable")
    p.add_argument("--glue-dir", help="original GLUE download (CoLA/, SST-2/, ...); default: the hub (nyu-mll/glue)")
    p.add_argument("--out", help="results folder (default: RUN/glue[/checkpoint-<step>] or ./glue_results/NAME)")
    p.add_argument("--protocol", default="fast",
                   help="fast: warm-up 6%%, weight decay 0.01, length-grouped batches, median seed of 3; reference: "
                   "exactly the reference's run_glue.py settings (lr 2e-5, 3 epochs, batch 32, length 512, no "
                   "warm-up or weight decay, seed 42). Named in every results table")
    p.add_argument("--seeds", type=int,
                   help="fine-tuning seeds per task (default: the protocol's, 3 or 1); the median seed by the task's "
                   "first metric is reported")
    p.add_argument("--name", help="model name in the table (default: run or folder name)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-5)")
    p.add_argument("--epochs", type=int, help="default 3")
    p.add_argument("--batch-size", type=int, help="default 32")
    p.add_argument("--max-length", type=int, help="default 512 as the reference; 128 is much faster")
    p.add_argument("--max-train-samples", type=int, help="fine-tune on a random subset (quick runs)")
    p.add_argument("--max-eval-samples", type=int, help="score on a random subset (quick runs)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], help="autocast dtype (default auto: bf16 on GPU)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="[TASK.]FIELD=VALUE",
                   help="any fine-tuning setting, for all tasks or one, e.g. --set rte.epochs=10; repeatable")
    p.add_argument("--force", action="store_true", help="recompute results already saved")
    p.add_argument("--gather-only", action="store_true", help="with --run: compute nothing, tabulate and plot saved results")
    p.add_argument("--progress", type=_boolean, default=True, metavar="true|false",
                   help="progress bars (as pretrain's --run.progress)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="the same as --progress=false")
    p.set_defaults(func=_run_glue)


def _run_glue(args: argparse.Namespace) -> None:
    from mlm.eval.glue import glue_command

    glue_command(
        model=args.model, run=args.run, steps=args.steps, tasks=args.tasks, task_files=args.task_file,
        glue_dir=args.glue_dir, out=args.out, seeds=args.seeds, name=args.name, protocol=args.protocol,
        lr=args.lr, epochs=args.epochs,
        batch_size=args.batch_size, max_length=args.max_length, max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples, device=args.device, dtype=args.dtype, settings=args.settings,
        force=args.force, gather_only=args.gather_only, progress=args.progress,
    )


# ---- end glue --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(  # the subcommands' parsers are of the same class
        prog="mlm",
        description="Pretrain BERT-, RoBERTa- and ModernBERT-family masked language models and score them on GLUE.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_tokenizer, _add_prepare, _add_pretrain, _add_demo, _add_glue, _add_bench):
        add(subparsers)
    # Read by main() before argparse; listed here for `mlm --help`.
    subparsers.add_parser("launch", add_help=False, help="run `mlm pretrain` on several processes or nodes: "
                          "torchrun's options, then the command (mlm launch --nproc_per_node=8 pretrain CONFIG)")
    return parser


def _boolean(text: str) -> bool:
    """true/false, as TOML and the pretrain settings spell booleans."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:  # torchrun's own options follow: not for argparse here
        from mlm.launch import launch

        try:
            sys.exit(launch(argv[1:]))
        except UserError as e:
            _fail(str(e), 2)
    args, extra = build_parser().parse_known_args(argv)
    # Only `pretrain` and `bench` take free-form --section.key=value overrides; anything unknown elsewhere is an error.
    if args.command in ("pretrain", "bench"):
        if args.command == "pretrain" and args.config is not None and args.config.startswith("--"):
            # argparse takes "--key=a b" (a space) for the recipe: an override, put back in its place, since
            # of two values for one key the later wins
            taken = {args.config, *extra}
            extra = [item for item in argv if item in taken]
            args.config = None
        # One spelling across commands: glue's --no-progress means --run.progress=false here too.
        args.overrides = ["--run.progress=false" if item == "--no-progress" else item for item in extra]
    elif extra:
        _fail(f"unrecognized arguments: {' '.join(extra)} (see mlm {args.command} --help)", 2)
    _quiet_deepspeed_on_cpu()
    try:
        args.func(args)
    except UserError as e:
        _fail(str(e), 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except OSError as e:  # a full disk, a read-only or forbidden folder: the user's to fix, so one line
        if os.environ.get("MLM_DEBUG"):
            raise
        _fail(_describe_os_error(e), 2)
    except BaseException as e:  # a bug: one line by default, the traceback with MLM_DEBUG=1
        if isinstance(e, SystemExit) or os.environ.get("MLM_DEBUG"):  # (torch's checkpoint errors are BaseExceptions)
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        from mlm.dist import LAUNCHED_BY_MLM, LOST_PEER_EXIT, is_lost_peer

        if is_lost_peer(e):  # not this rank's fault: the rank that failed first says why (mlm launch names it)
            if not os.environ.get(LAUNCHED_BY_MLM):
                _fail(f"lost contact with another rank ({first[:200]}): it failed or was stopped; the launcher's log "
                      "names it (MLM_DEBUG=1 makes every rank print its error)", LOST_PEER_EXIT)
            sys.exit(LOST_PEER_EXIT)
        _fail(f"unexpected {type(e).__name__}: {first} (a bug in mlm: MLM_DEBUG=1 shows the traceback)", 1)


def _quiet_deepspeed_on_cpu() -> None:
    """transformers' save_pretrained imports deepspeed when it is installed (accelerate unwraps models with it),
    and deepspeed, finding no GPU, then warns "Setting accelerator to CPU" in every command that saves a model.
    Naming the CPU accelerator first, where DeepSpeed reads it, keeps it quiet; with a GPU DeepSpeed finds it."""
    import importlib.util

    if "DS_ACCELERATOR" in os.environ or importlib.util.find_spec("deepspeed") is None:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def _fail(message: str, code: int) -> None:
    from mlm.dist import LAUNCHED_BY_MLM, launched_rank

    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and os.environ.get(LAUNCHED_BY_MLM):  # for the launcher, in torchrun's error-file format
        with open(error_file, "w") as f:
            json.dump({"message": f"error: {message}", "timestamp": int(time.time())}, f)
    if launched_rank() == 0:  # under torchrun every rank fails alike: say it once
        print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _describe_os_error(e: OSError) -> str:
    where = f" at {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on device{where}; what was there before is kept: free some space and run again"
    if e.errno == errno.EFBIG:
        return (f"file size limit reached{where} (ulimit -f, or the file system's largest file); what was there "
                "before is kept: raise the limit or choose another folder, and run again")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{where} ({e.strerror}): choose a folder you can write to"
    if e.errno == errno.ENOTDIR:  # a folder wanted below a file
        return f"{e.filename}: part of this path is a file, not a folder: choose another path"
    if e.errno == errno.EEXIST and e.filename and Path(e.filename).is_file():  # mkdir where a file stands
        return f"{e.filename} is a file, not a folder: choose another path"
    return f"{e.strerror or e}{where}"
