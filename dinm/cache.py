"""Tensors kept between processes (the benign-key statistic, the semantic judge's head), as safetensors files in
`$DINM_CACHE`, else `$XDG_CACHE_HOME/dinm`, else `~/.cache/dinm`. A file's name is a hash of everything its content
depends on, so a stale file is never read; it is written whole or not at all (`dinm.atomic.replacing`); an
unreadable one is ignored (and recomputed), and a read-only or full disk costs only the recomputation."""

from __future__ import annotations

import hashlib
import logging
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import atomic

logger = logging.getLogger(__name__)


def file_sha256(path: str) -> str:
    """The SHA-256 of the file at `path` (hex), read in 16 MiB blocks: what names and checks kept files."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> str | None:
    """Where cached tensors are kept; None when `DINM_CACHE` is "off" (or "0", "")."""
    chosen = os.environ.get("DINM_CACHE")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "0", "off", "false", "no") else os.path.expanduser(chosen)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "dinm")


def path_for(name: str) -> str | None:
    """The cache file `name` (None when caching is off)."""
    folder = cache_dir()
    return None if folder is None else os.path.join(folder, name)


def read(path: str | None, names: tuple[str, ...], what: str) -> dict[str, torch.Tensor] | None:
    """The tensors `names` of the cache file at `path`, or None when it is absent, torn or foreign."""
    if path is None or not os.path.exists(path):
        return None
    try:
        tensors = load_file(path)
        return {name: tensors[name] for name in names}
    except (OSError, SafetensorError, KeyError, ValueError, RuntimeError) as e:
        logger.warning("ignoring the unreadable %s %s (%s); computing it again", what, path, e)
        return None


def write(path: str | None, tensors: dict[str, torch.Tensor], meta: dict[str, str], what: str) -> None:
    """Keep `tensors` at `path`; a failure is logged, never raised."""
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic.replacing(path) as partial:  # written whole, then renamed: a reader never sees half a file
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, partial, metadata=meta)
    except (OSError, SafetensorError) as e:  # (safetensors reports a full disk as its own error)
        logger.warning("could not keep the %s in %s (%s); set DINM_CACHE to a writable folder, or to off",
                       what, path, e)
