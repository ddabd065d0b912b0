"""Train, load and fingerprint tokenizers.

RoBERTa family: byte-level BPE with `<s> <pad> </s> <unk> <mask>` (ids 0..4, as in roberta-base).
BERT family: uncased WordPiece with `[PAD] [UNK] [CLS] [SEP] [MASK]`.
ModernBERT family: cased byte-level BPE with ModernBERT's `[PAD] [UNK] [CLS] [SEP] [MASK]` and its
`[CLS] … [SEP]` template; no token type ids (ModernBERT has no segment embeddings).
All are saved as Hugging Face tokenizer directories that `AutoTokenizer.from_pretrained(dir)` loads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from mlm.atomic import atomic_dir, os_error_behind
from mlm.errors import UserError, first_line
from mlm.hub import cache_only, hub_host, looks_local
from mlm.model.loading import from_pretrained

ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DEFAULT_MODEL_MAX_LENGTH = 512  # the positions of the default model (model.max_positions)
TRAINING_PIECE_CHARS = 1 << 16
"""Documents are handed to the tokenizer trainer in pieces of at most this many characters, cut before a
whitespace character: the trainer holds some 100 bytes per character of a text it splits (one 50 MB line took
4 GB), and both families' pre-tokenizers split at whitespace anyway, so the words it counts are the same."""


def _byte_level_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, specials: list[str]) -> Tokenizer:
    """A byte-level BPE trained on `texts`, its special tokens first (ids 0…); the last one, the mask token,
    swallows the space before it, so "the <mask> sat" masks the word " cat" as the published tokenizers do."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials[:-1] + [AddedToken(specials[-1], lstrip=True, special=True)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _roberta_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int):
    from transformers import RobertaTokenizerFast

    tok = _byte_level_bpe(texts, vocab_size, min_frequency, ROBERTA_SPECIALS)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return RobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )


def _modernbert_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int):
    from transformers import PreTrainedTokenizerFast

    tok = _byte_level_bpe(texts, vocab_size, min_frequency, BERT_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "attention_mask"],  # no segment embeddings: no token type ids
    )


def _bert_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int):
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=BERT_SPECIALS, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    # tokenizer_object, not vocab_file: with transformers 5 a vocab_file alone gives a 5-token vocabulary.
    return BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        do_lower_case=True,
    )


def training_pieces(texts: Iterable[str], limit: int | None = None) -> Iterator[str]:
    """Each text, cut into pieces of at most `limit` (TRAINING_PIECE_CHARS) characters just before a whitespace
    character (hard at the limit in a run with none): the trainer counts the same words, in bounded memory."""
    limit = limit or TRAINING_PIECE_CHARS
    for text in texts:
        start = 0
        while len(text) - start > limit:
            cut = max(text.rfind(space, start + 1, start + limit) for space in " \n\t")
            cut = cut if cut > start else start + limit
            yield text[start:cut]
            start = cut
        yield text[start:] if start else text


TOKENIZER_BUILDERS = {"bpe-roberta": _roberta_tokenizer, "wordpiece": _bert_tokenizer, "bpe-bert": _modernbert_tokenizer}
"""Family.tokenizer_kind → (texts, vocab_size, min_frequency) → an untrained-on-disk tokenizer."""


def train_tokenizer(
    texts: Iterable[str], family: str, vocab_size: int, out_dir: str | Path, min_frequency: int = 2,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
):
    """Train a tokenizer of the family's kind on `texts` and save it to `out_dir` (atomically).

    `model_max_length` is what `truncation=True` cuts inputs to: the positions of the model it serves
    (checkpoints set their own model's)."""
    from mlm.model.families import FAMILIES

    if family not in FAMILIES:
        raise UserError(f"unknown model family {family!r}: choose one of {', '.join(FAMILIES)}")
    if vocab_size < 300:
        raise UserError(f"vocab_size={vocab_size} is too small: use at least 300 (byte-level BPE alone needs 256)")
    if vocab_size > 2**32 - 1:
        raise UserError(f"vocab_size={vocab_size} is too large")
    kind = FAMILIES[family].tokenizer_kind
    tokenizer = TOKENIZER_BUILDERS[kind](training_pieces(texts), vocab_size, min_frequency)
    tokenizer.model_max_length = model_max_length
    # Byte-level BPE always holds the 256 byte symbols; WordPiece only what it saw.
    if len(tokenizer) <= len(ROBERTA_SPECIALS) + (256 if kind.startswith("bpe") else 0):
        raise UserError("the corpus is empty: the tokenizer learned no tokens")
    save_tokenizer(tokenizer, out_dir)
    return tokenizer


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """Save to a temporary sibling directory, then rename, so a crash never leaves half a tokenizer."""
    with atomic_dir(out_dir) as tmp:
        try:
            tokenizer.save_pretrained(str(tmp))
        except Exception as e:  # the Rust writer says "File too large (os error 27)" in a plain Exception
            error = os_error_behind(e, out_dir)
            if error is None:
                raise
            raise error from e


# The JSON files transformers reads from a tokenizer folder: each must be an object, or it fails deep inside.
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "config.json", "vocab.json")


def check_tokenizer_folder(folder: Path, name: str) -> None:
    """A local tokenizer folder must hold a vocabulary: without one transformers builds a tokenizer of the
    special tokens alone (5 tokens), and every document would become one unknown token."""
    vocabulary = (
        (folder / "tokenizer.json").is_file()  # a fast tokenizer, as mlm and save_pretrained write it
        or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())  # a slow BPE (GPT-2, RoBERTa)
        or (folder / "vocab.txt").is_file()  # a slow WordPiece (BERT)
        or any(p.is_file() for p in folder.glob("*.model"))  # a SentencePiece model
    )
    if not vocabulary:
        what = "is not a file" if (folder / "tokenizer.json").exists() else "is missing"
        raise UserError(f"tokenizer folder {name} holds no vocabulary: tokenizer.json {what} (nor are there the "
                        "vocab.json + merges.txt, vocab.txt or .model files of a slow tokenizer); give a whole "
                        "tokenizer folder, as `mlm tokenizer` writes")
    for file_name in TOKENIZER_JSON_FILES:
        path = folder / file_name
        if not path.exists():
            continue
        if not path.is_file():
            raise UserError(f"{path} is not a file: copy the tokenizer folder again")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is damaged (not valid JSON: {first_line(e)}): copy the tokenizer folder again") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} is damaged (not a JSON object): copy the tokenizer folder again")


def load_tokenizer(name_or_dir: str | Path):
    """Load a tokenizer from a local directory or a Hugging Face hub name (`roberta-base`, `bert-base-uncased`)."""
    from transformers import AutoTokenizer

    name = str(name_or_dir)
    if not name:
        raise UserError("no tokenizer given")
    local = looks_local(name)
    if local and not Path(name).expanduser().is_dir():
        raise UserError(f"tokenizer directory {name} does not exist")
    if local:
        check_tokenizer_folder(Path(name).expanduser(), name)
    from_cache = cache_only(name)
    try:
        tokenizer = from_pretrained(AutoTokenizer, str(Path(name).expanduser()) if local else name,
                                    "a tokenizer", local_files_only=from_cache)
    except (OSError, ValueError) as e:
        if from_cache:
            raise UserError(f"cannot load tokenizer {name!r}: the hub ({hub_host()}) cannot be reached and it is not "
                            "in the local cache; give a tokenizer folder, or run where the hub can be reached") from None
        raise UserError(f"cannot load tokenizer {name!r}: {first_line(e)}") from None
    if not tokenizer.is_fast:
        raise UserError(f"tokenizer {name!r} has no fast (Rust) implementation, which data preparation needs")
    if tokenizer.mask_token_id is None or tokenizer.sep_token_id is None or tokenizer.cls_token_id is None:
        raise UserError(f"tokenizer {name!r} lacks a mask, separator or classification token: not an MLM tokenizer")
    if not isinstance(tokenizer.model_max_length, int) or tokenizer.model_max_length < 1:  # truncation would fail
        raise UserError(f"tokenizer {name!r} has model_max_length {tokenizer.model_max_length!r}: it must be a positive "
                        "number (its tokenizer_config.json is damaged)")
    return tokenizer


MAX_MODEL_LENGTH = 1_000_000
"""Far beyond any encoder's positions: a larger --model-max-length is a typo."""


def tokenizer_family(tokenizer) -> str:
    """Which family's special-token layout the tokenizer uses."""
    return "roberta" if tokenizer.cls_token == "<s>" else "bert"


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of everything that decides token ids: vocabulary, added tokens, and the special-token map."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "specials": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "lower": bool(getattr(tokenizer, "do_lower_case", False)),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def check_tokenizer_out(out_dir: Path, overwrite: bool) -> None:
    """Never replace a folder by accident: an existing one only with overwrite, and only if it is a tokenizer."""
    if out_dir.name in ("", ".."):  # "", ".", "..", "/": the tokenizer is renamed into place, so it needs a name
        raise UserError(f"--out {str(out_dir)!r} names no folder of its own: name a new or tokenizer folder "
                        "(e.g. --out tok)")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file: choose a folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise UserError(f"--out {out_dir} already exists: choose another folder, or --overwrite to replace that tokenizer")
    if not (out_dir / "tokenizer_config.json").is_file():
        raise UserError(f"--out {out_dir} is not a tokenizer folder (no tokenizer_config.json): --overwrite replaces "
                        "only a tokenizer; choose another folder")


def build_tokenizer(
    out_dir: str | Path,
    sources: list[str] | None = None,
    family: str = "roberta",
    vocab_size: int = 32_000,
    min_frequency: int = 2,
    text_field: str = "text",
    from_name: str = "",
    log=print,
    document_per_file: bool = False,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    overwrite: bool = False,
):
    """`mlm tokenizer`: train a tokenizer on a corpus, or copy an existing one (hub name or directory), into out_dir."""
    from mlm.data.corpus import ReadStats, check_sources, iter_documents

    if min_frequency < 0:
        raise UserError(f"--min-frequency must be >= 0, got {min_frequency}")
    if not 1 <= model_max_length <= MAX_MODEL_LENGTH:
        raise UserError(f"--model-max-length must be between 1 and {MAX_MODEL_LENGTH:,}, got {model_max_length}")
    if from_name and sources:  # both would leave the user believing the corpus was used
        raise UserError("--from copies a tokenizer and --corpus trains one: give one of them, not both")
    if not str(out_dir):
        raise UserError("--out is empty: name a new or tokenizer folder (e.g. --out tok)")
    check_tokenizer_out(Path(out_dir), overwrite)

    if from_name:
        tokenizer = load_tokenizer(from_name)
        if tokenizer.model_max_length > 1_000_000:  # transformers' "no limit" placeholder: truncation would cut nothing
            tokenizer.model_max_length = model_max_length
        save_tokenizer(tokenizer, out_dir)
        log(f"saved {from_name} ({len(tokenizer):,} tokens, {tokenizer_family(tokenizer)} layout) to {out_dir}")
        return tokenizer
    if not sources:
        raise UserError("give --corpus to train a tokenizer or --from to copy one")
    check_sources(sources, log)
    stats = ReadStats()
    documents = iter_documents(sources, stats, text_field, document_per_file=document_per_file)
    tokenizer = train_tokenizer(documents, family, vocab_size, out_dir, min_frequency, model_max_length)
    if stats.bad_utf8:
        log(stats.bad_utf8_warning())
    log(f"trained a {family} tokenizer of {len(tokenizer):,} tokens on {stats.documents:,} documents → {out_dir}")
    if len(tokenizer) < vocab_size:  # training stops when no merge or word is seen min_frequency times any more
        log(f"note: {vocab_size:,} tokens were asked; this corpus supports no more than {len(tokenizer):,} at "
            f"--min-frequency {min_frequency} (a larger corpus, or a lower --min-frequency, gives more)")
    return tokenizer
