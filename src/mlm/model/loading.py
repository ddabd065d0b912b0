"""Every load of a model, config or tokenizer from a folder or hub name goes through `from_pretrained`.

A checkpoint is data, never code. transformers imports Python files a checkpoint names (`auto_map` in its
config.json or tokenizer_config.json) when `trust_remote_code` is true, and when it is left unset it asks
"Do you wish to run the custom code? [y/N]" on stdin, so `echo y |` or a careless keypress runs the folder's
code. Here `trust_remote_code=False` is passed on every load (no question is ever asked), a local folder that
names code or a model type transformers does not know is refused before transformers reads it, and a pickle
(`pytorch_model.bin`) is read only as weights: one that needs more is refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mlm.errors import UserError

CODE_FILES = ("config.json", "tokenizer_config.json")
"""The files whose `auto_map` makes transformers import a folder's Python."""


def _json_object(path: Path) -> dict:
    """A JSON file's object; {} when it is absent or unreadable (transformers then fails on it in its own way)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _no_code(shown: str, what: str, reason: str) -> UserError:
    return UserError(f"{shown}: cannot load it as {what} without running its code ({reason}); mlm never runs code "
                     "from a checkpoint: use a checkpoint of a model type transformers ships")


def check_no_code(folder: str | Path, what: str = "a checkpoint") -> None:
    """Refuse a local folder whose config.json or tokenizer_config.json names Python files to import (auto_map),
    or whose config.json has a model_type transformers does not know (which only the folder's code defines)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    folder = Path(folder)
    for name in CODE_FILES:
        data = _json_object(folder / name)
        if data.get("auto_map"):
            raise _no_code(str(folder), what, f"{name} has auto_map, naming Python files of the folder")
    model_type = _json_object(folder / "config.json").get("model_type")
    if model_type is not None and model_type not in CONFIG_MAPPING:
        raise _no_code(str(folder), what, f"config.json has model_type {model_type!r}, which transformers does not "
                                          "know")


@contextmanager
def _refusals(shown: str, what: str) -> Iterator[None]:
    """What transformers refuses for safety, said in one line: a pickle that is more than tensors (it would run
    code to load; never retried unsafely), a hub checkpoint that names code."""
    try:
        yield
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met a global it does not allow
        raise UserError(f"{shown}: cannot load it as {what}: its pytorch_model.bin is a pickle that holds more than "
                        "weights, and unpickling it could run code; mlm loads only safetensors or weights-only "
                        "pickles: save the checkpoint with safetensors (save_pretrained's default)") from None
    except ValueError as e:  # a hub checkpoint that names code: transformers refuses it with trust_remote_code=False
        if "trust_remote_code" in str(e):
            raise _no_code(shown, what, "it names Python files of its own") from None
        raise


def from_pretrained(cls, name_or_path: str | Path, what: str, **kwargs):
    """`cls.from_pretrained(name_or_path, **kwargs)` (cls: an Auto* class of transformers) that never runs the
    checkpoint's code and never asks; `what` names the thing loaded in the error ("a tokenizer").

    Errors transformers raises for other reasons (a missing file, a damaged one, no network) are left to the
    caller, which knows what the path was meant to be."""
    name = str(name_or_path)
    if os.path.isdir(name):  # transformers' own test: a folder by this name wins over a hub name
        check_no_code(name, what)
    with _refusals(name, what):
        return cls.from_pretrained(name, trust_remote_code=False, **kwargs)
