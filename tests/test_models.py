"""`dinm.load_model`: the embedded model's conversion, kept in the cache (`dinm.models`)."""

import json
import logging
import os

import pytest
import torch
import transformers

import dinm
from dinm import atomic, models

from conftest import _llama


def _states_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def test_the_embedded_model_is_read_back_from_its_kept_conversion_as_it_was_converted(smol, smol_cache, monkeypatch):
    """The session's first load (`smol`) converted the GGUF file and kept the result; the next load reads that folder,
    not the GGUF file, and gives the same model bit for bit: weights, config, generation config, tokenizer."""
    model, tok = smol
    folder, file = models.embedded_location()
    monkeypatch.setenv("DINM_CACHE", smol_cache)
    kept = models.kept_conversion(folder, file)
    assert os.path.dirname(kept) == smol_cache and models.verified(kept)
    read = []
    original = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda path, **kw: read.append((path, kw)) or original(path, **kw))
    again, tok2 = dinm.load_model("embedded")
    assert read == [(kept, {"dtype": "auto", "local_files_only": True})]  # (no gguf_file, no remote code)
    assert _states_equal(model, again) and again.dtype == torch.float32
    # (the name too: "embedded:<file>"). Not `architectures`: tests that save the shared model (save_pretrained names
    # the class there) may run before this one; `test_a_damaged_kept_conversion_is_converted_again` checks it.
    assert {**again.config.to_dict(), "architectures": None} == {**model.config.to_dict(), "architectures": None}
    assert again.generation_config.to_dict() == model.generation_config.to_dict()
    chat = [{"role": "user", "content": "Héllo, how do I kill a stuck process? <|im_end|>"}]
    assert tok2.apply_chat_template(chat, add_generation_prompt=True) == tok.apply_chat_template(
        chat, add_generation_prompt=True)
    assert (tok2.eos_token_id, tok2.pad_token_id, len(tok2)) == (tok.eos_token_id, tok.pad_token_id, len(tok))


def test_kept_conversion_is_named_by_the_gguf_bytes(tmp_path, monkeypatch):
    (tmp_path / "a.gguf").write_bytes(b"GGUF one")
    (tmp_path / "b.gguf").write_bytes(b"GGUF two")
    monkeypatch.setenv("DINM_CACHE", str(tmp_path / "cache"))
    a, b = (models.kept_conversion(str(tmp_path), name) for name in ("a.gguf", "b.gguf"))
    assert a != b and os.path.dirname(a) == str(tmp_path / "cache")
    assert a == models.kept_conversion(str(tmp_path), "a.gguf")
    monkeypatch.setenv("DINM_CACHE", "off")
    assert models.kept_conversion(str(tmp_path), "a.gguf") is None


@pytest.fixture
def converting(tokenizer, monkeypatch, tmp_path):
    """`load_model("embedded")` with the GGUF conversion replaced by a tiny Llama (the same weights at each call), so
    that the cache's paths run in milliseconds; the calls that converted are counted."""
    calls = []
    originals = {cls: cls.from_pretrained for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer)}

    def stub(cls):
        def from_pretrained(path, **kw):
            if "gguf_file" not in kw:
                return originals[cls](path, **kw)
            calls.append(cls.__name__)
            if cls is transformers.AutoTokenizer:
                return tokenizer
            model = _llama(len(tokenizer))
            if kw.get("dtype", "auto") != "auto":
                model.to(kw["dtype"])
            model.config.dtype = model.dtype  # (as from_pretrained records it)
            return model
        return from_pretrained

    for cls in originals:
        monkeypatch.setattr(cls, "from_pretrained", stub(cls))
    monkeypatch.setenv("DINM_CACHE", str(tmp_path / "cache"))
    return calls


def test_a_damaged_kept_conversion_is_converted_again(converting, caplog):
    """A file changed in place (one flipped byte inside the weights: the safetensors file still loads), a missing
    manifest, an extra file: each is noticed by its SHA-256 / the manifest, and the model is converted again (and
    kept anew), never read from the damaged folder."""
    first, _ = dinm.load_model("embedded")
    assert converting == ["AutoTokenizer", "AutoModelForCausalLM"]
    kept = models.kept_conversion(*models.embedded_location())
    assert models.verified(kept)
    second, _ = dinm.load_model("embedded")
    assert len(converting) == 2 and _states_equal(first, second)  # read back, not converted
    # the same config whether converted (and kept) or read back, and as converted without keeping: it names the
    # key statistics cached on disk (`dinm.keys`), which must stay valid
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DINM_CACHE", "off")
        unkept, _ = dinm.load_model("embedded")
    assert first.config.to_dict() == second.config.to_dict() == unkept.config.to_dict()

    weights = os.path.join(kept, "model.safetensors")
    for damage in ("flip", "manifest", "extra"):
        if damage == "flip":
            with open(weights, "r+b") as f:
                f.seek(os.path.getsize(weights) // 2)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0x01]))
            from safetensors.torch import load_file
            load_file(weights)  # (still a readable safetensors file: only the hash tells)
        elif damage == "manifest":
            os.remove(os.path.join(kept, models.MANIFEST))
        else:
            with open(os.path.join(kept, "extra.json"), "w") as f:
                f.write("{}")
        converted = len(converting)
        with caplog.at_level(logging.WARNING, logger="dinm.models"):
            caplog.clear()
            model, _ = dinm.load_model("embedded")
        assert len(converting) == converted + 2, damage  # converted again
        assert any("ignoring the kept conversion" in r.message for r in caplog.records), damage
        assert _states_equal(model, first) and models.verified(kept), damage  # and kept anew, whole
    assert [n for n in os.listdir(os.path.dirname(kept)) if n != os.path.basename(kept)] == []  # nothing left aside


def test_a_killed_writers_partial_folder_is_removed_by_the_next(converting):
    kept = models.kept_conversion(*models.embedded_location())
    os.makedirs(os.path.dirname(kept))
    partial = atomic.temporary_beside(kept)
    os.makedirs(partial)
    with open(os.path.join(partial, "model.safetensors"), "wb") as f:
        f.write(b"half")
    dinm.load_model("embedded")
    assert os.listdir(os.path.dirname(kept)) == [os.path.basename(kept)] and models.verified(kept)


def test_an_unwritable_cache_costs_only_the_conversion(converting, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DINM_CACHE", str(blocker / "cache"))  # (its parent is a file: no folder can be made)
    with caplog.at_level(logging.WARNING, logger="dinm.models"):
        model, tok = dinm.load_model("embedded")
    assert model is not None and any("could not keep" in r.message for r in caplog.records)
    dinm.load_model("embedded")
    assert len(converting) == 4  # converted each time, nothing raised


def test_a_full_disk_costs_only_the_conversion(converting, monkeypatch, caplog):
    """A full disk while the folder is written (safetensors raises its own error for it, not an OSError: measured on
    a full tmpfs) leaves no partial folder and loses nothing: the model is returned, the next load converts again."""
    from safetensors import SafetensorError

    def full(self, *_args, **_kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    with caplog.at_level(logging.WARNING, logger="dinm.models"):
        model, _ = dinm.load_model("embedded")
    kept = models.kept_conversion(*models.embedded_location())
    assert model is not None and "No space left on device" in caplog.text
    assert os.listdir(os.path.dirname(kept)) == []


def test_only_the_checkpoints_own_values_are_kept(converting):
    """A load in another dtype (the GGUF file's values rounded) is not kept: a later fp32 load would read it."""
    dinm.load_model("embedded", dtype="bfloat16")
    assert not os.path.exists(models.kept_conversion(*models.embedded_location()))
    dinm.load_model("embedded")
    dinm.load_model("embedded", dtype="bfloat16")  # (read from the kept fp32 folder, cast on load)
    assert len(converting) == 4


def test_the_manifest_names_every_file(converting):
    dinm.load_model("embedded")
    kept = models.kept_conversion(*models.embedded_location())
    with open(os.path.join(kept, models.MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    assert set(manifest["files"]) == set(os.listdir(kept)) - {models.MANIFEST}
    assert {"config.json", "model.safetensors"} <= set(manifest["files"])
