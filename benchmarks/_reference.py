"""The paper's own code (EasyEdit), run unchanged from a checkout the user points at, beside dinm in one process.

Nothing of EasyEdit is committed or downloaded: `load(path)` imports its DINM module (`easyeditor/models/dinm/
dinm_main.py`: `execute_dinm`, with its hyperparameter class and the loss helpers it imports) from the checkout,
and takes `SafetyEditor._locate_toxic_layer` from `easyeditor/editors/safety_editor.py` by its source. EasyEdit's
package `__init__` files are bypassed (they import every editor and their dependencies: openai, sentence-
transformers, ...); the modules DINM runs are EasyEdit's own, byte for byte.

The edit is what `SafetyEditor.edit(editing_method="DINM")` times as `exec_time`, per record: locate (on the bare
safe and unsafe responses), then `execute_dinm` on the request whose prompt carries the system-prompt suffix (as in
`examples/run_safety_editing.py`), with the hyperparameters of `hparams/DINM/llama-7b.yaml` (10 steps, lr 5e-4,
kl_factor 0.1) on the located layer, the model with `output_hidden_states=True` and the tokenizer's pad token set
to its end token, as `SafetyEditor` loads them. `execute_dinm` restores the model's weights itself; its per-step
printing goes to a buffer.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib
import io
import os
import sys
import types

import torch

HPARAMS = "hparams/DINM/llama-7b.yaml"


class Reference:
    """EasyEdit's DINM, loaded from the checkout at `repo`; `edit(model, tokenizer, instance)` runs it."""

    def __init__(self, repo: str):
        root = os.path.join(os.path.abspath(repo), "easyeditor")
        main_file = os.path.join(root, "models", "dinm", "dinm_main.py")
        if not os.path.isfile(main_file):
            raise SystemExit(f"--reference-repo {repo}: no easyeditor/models/dinm/dinm_main.py there; point it at a "
                             f"checkout of https://github.com/zjunlp/EasyEdit")
        for name, sub in (("easyeditor", ""), ("easyeditor.util", "util"), ("easyeditor.trainer", "trainer"),
                          ("easyeditor.models", "models"), ("easyeditor.models.dinm", "models/dinm")):
            package = types.ModuleType(name)
            package.__path__ = [os.path.join(root, sub)]  # (submodules import from here; __init__ is not run)
            sys.modules[name] = package
        losses = importlib.import_module("easyeditor.trainer.losses")
        trainer = sys.modules["easyeditor.trainer"]
        trainer.kl_loc_loss, trainer.masked_log_probs = losses.kl_loc_loss, losses.masked_log_probs
        self.main = importlib.import_module("easyeditor.models.dinm.dinm_main")
        device = importlib.import_module("easyeditor.util.device")
        self.locate_fn = _method(os.path.join(root, "editors", "safety_editor.py"), "SafetyEditor",
                                 "_locate_toxic_layer", {"torch": torch, "move_to_device": device.move_to_device})
        hparams = os.path.join(os.path.abspath(repo), HPARAMS)
        if not os.path.isfile(hparams):
            raise SystemExit(f"--reference-repo {repo}: no {HPARAMS} there; point it at a whole EasyEdit checkout")
        self.hparams = self.main.DINMHyperParams.from_hparams(hparams)
        self.hparams.device = "cpu"
        self._tokenizers: dict = {}

    def tokenizer(self, tokenizer):
        """A copy of `tokenizer` set up as SafetyEditor sets its own (pad = end token), made once, outside the
        timed edit; the caller's tokenizer is left alone."""
        if id(tokenizer) not in self._tokenizers:
            tok = copy.deepcopy(tokenizer)
            tok.pad_token_id = tok.eos_token_id
            self._tokenizers[id(tokenizer)] = (tokenizer, tok)  # (the original kept alive: its id stays its own)
        return self._tokenizers[id(tokenizer)][1]

    def edit(self, model, tokenizer, instance) -> tuple[int, dict]:
        """EasyEdit's locate + `execute_dinm` on one instance: (the layer it edited, the update it computed)."""
        tok = self.tokenizer(tokenizer)
        suffix = self.hparams.suffix_system_prompt
        request = {"prompt": instance.prompt, "target_new": instance.safe, "ground_truth": instance.unsafe,
                   "locality": {}}
        with_suffix = {"prompt": f"{instance.prompt} {suffix}", "target_new": instance.safe,
                       "ground_truth": instance.unsafe,
                       "locality": {"general knowledge constraint": {
                           "prompt": f"{instance.benign_prompt} {suffix}", "ground_truth": instance.benign_answer}}}
        hparams = copy.copy(self.hparams)
        flags = [(p, p.requires_grad) for p in model.parameters()]
        hidden = model.config.output_hidden_states
        model.config.output_hidden_states = True  # SafetyEditor loads the model so
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                hparams.layers = self.locate_fn(types.SimpleNamespace(hparams=hparams), model, tok, [request])
                deltas = self.main.execute_dinm(model, tok, [with_suffix], hparams)
        finally:
            model.config.output_hidden_states = hidden
            for p, flag in flags:  # (EasyEdit leaves requires_grad off on every parameter but the edited one)
                p.requires_grad_(flag)
        return hparams.layers[0], deltas


def _method(path: str, cls: str, name: str, namespace: dict):
    """The function `cls.name` defined in the file at `path`, compiled from its own source in `namespace`."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    node = next((f for c in tree.body if isinstance(c, ast.ClassDef) and c.name == cls for f in c.body
                 if isinstance(f, ast.FunctionDef) and f.name == name), None)
    if node is None:
        raise SystemExit(f"{path}: no {cls}.{name} (has EasyEdit changed?)")
    module = ast.Module(body=[node], type_ignores=[])
    exec(compile(module, path, "exec"), namespace)
    return namespace[name]
