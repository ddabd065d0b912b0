"""Reaching the Hugging Face hub, or failing in a second when there is no network.

Without a network the hub libraries retry every file for about 25 s, printing each retry, before they say
they could not connect. When the hub's host name does not resolve, mlm goes to the local cache at once
(a tokenizer) or says so in one line (a dataset), naming the way forward.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse


def hub_host() -> str:
    """The host mlm's libraries download from (HF_ENDPOINT, else huggingface.co)."""
    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def offline_by_choice() -> bool:
    """The user asked the libraries to use their cache only (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def looks_local(name: str) -> bool:
    """Whether a model or tokenizer name means a folder: one that exists, or a path that starts like one or has
    more than one "/" ("name" and "org/name" may be hub names)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def cache_only(name: str) -> bool:
    """A hub name that only the local cache can answer now (no network, or offline by choice): the hub
    libraries would retry each file for ~25 s, the cache answers at once."""
    return not looks_local(name) and (offline_by_choice() or not hub_reachable())


def hub_reachable() -> bool:
    """Whether the hub's host name resolves (no network, or no DNS: it does not)."""
    try:
        socket.getaddrinfo(hub_host(), 443)
    except (OSError, UnicodeError):  # socket.gaierror is an OSError
        return False
    return True
