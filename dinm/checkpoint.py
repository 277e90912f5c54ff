"""Apply and revert deltas on Hugging Face checkpoint folders on disk, without loading the model.

Only the shard(s) holding the delta's tensors are read and rewritten. Into a new folder (`output=`), the other
files are hard-linked (copied where links are impossible) and the folder appears at once (built under a
temporary name, then renamed). In place, nothing is ever written into an existing file:

* single file (``model.safetensors``): the new file is written beside it, fsync'ed, then ``os.replace``d;
* sharded (``model.safetensors.index.json``): each rewritten shard is written under a new name, fsync'ed,
  then the index (the only file that says which shard holds what) is replaced — last. A crash at any point
  leaves the folder loadable and either as it was or fully edited; old shards are removed after the index.

Every check (fingerprints, shapes, dtypes, the chain of deltas applied) runs before anything is written.
Each rewritten shard records the deltas applied to it, in order (metadata key ``dinm.chain``), so that a
revert out of order is refused with the delta to revert first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .delta import Delta, _dtype_name, fingerprint, mismatch
from .errors import DeltaError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE = ("pytorch_model.bin", "pytorch_model.bin.index.json")
CHAIN = "dinm.chain"
_SUFFIX = re.compile(r"\.dinm-[0-9a-f]{12}(?=\.safetensors$)")

# Crash injection for tests: called with the name of each write step just after it completed.
_after_step: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if _after_step is not None:
        _after_step(name)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def layout(folder: str) -> tuple[dict[str, str], str | None]:
    """(tensor name -> shard file, index path or None) of a safetensors checkpoint folder."""
    if not os.path.isdir(folder):
        raise DeltaError(f"checkpoint `{folder}` is not a folder")
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DeltaError(f"checkpoint index `{index}` is unreadable ({e}); restore it from the original") from None
        return dict(weight_map), index
    if os.path.isfile(os.path.join(folder, SINGLE)):
        with safe_open(os.path.join(folder, SINGLE), framework="pt") as f:
            return {k: SINGLE for k in f.keys()}, None
    if any(os.path.isfile(os.path.join(folder, p)) for p in PICKLE):
        raise DeltaError(
            f"checkpoint `{folder}` is a pickle checkpoint (pytorch_model.bin); dinm reads safetensors only. Convert "
            f"it once: python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{folder}').save_pretrained('NEW_FOLDER')\"")
    raise DeltaError(f"checkpoint `{folder}` has neither {SINGLE} nor {INDEX}")


def _read_shard(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DeltaError(f"shard `{path}` is not a readable safetensors file ({e})") from None


def _delta_id(delta: Delta) -> str:
    return hashlib.sha256(delta.metadata["tensors"].encode()).hexdigest()[:12]


def _plan(delta: Delta, folder: str, revert: bool, force: bool):
    """Read the touched shards, check everything, and compute their new contents (nothing written)."""
    weight_map, index = layout(folder)
    want = "edited" if revert else "base"
    me = _delta_id(delta)
    shards: dict[str, tuple[dict, dict]] = {}
    for name, desc in delta.described.items():
        if name not in weight_map:
            raise DeltaError(f"checkpoint `{folder}` has no tensor {name!r}; this delta is for "
                             f"{delta.metadata.get('base_model', '?')}")
        shard = weight_map[name]
        if shard not in shards:
            shards[shard] = _read_shard(os.path.join(folder, shard))
        tensors, meta = shards[shard]
        t = tensors[name]
        if list(t.shape) != desc["shape"] or _dtype_name(t.dtype) != desc["dtype"]:
            raise DeltaError(f"tensor {name!r} is {_dtype_name(t.dtype)}{list(t.shape)} in "
                             f"`{folder}` but {desc['dtype']}{desc['shape']} in the delta")
        chain = json.loads(meta.get(CHAIN, "[]"))
        touching = [c for c in chain if name in c["tensors"]]
        if revert and touching and touching[-1]["id"] != me and not force:
            raise DeltaError(f"refusing to revert: delta {touching[-1]['id']} was applied to {name!r} after this "
                             f"one ({me}); revert {touching[-1]['id']} first")
        found = None if force else fingerprint(t)
        why = None if force else mismatch(desc, found, want)
        if why:
            if not revert and touching and found != desc["edited_sha256"]:
                why = (f"delta {touching[-1]['id']} changed it since this delta's base; revert it first, or "
                       f"make this delta on the edited model")
            raise DeltaError(f"refusing to {'revert' if revert else 'apply'}: tensor {name!r} in `{folder}` does not "
                             f"match: {why}; pass --force to override")
    for shard, (tensors, meta) in shards.items():
        names = [n for n in delta.described if weight_map[n] == shard]
        with torch.no_grad():
            for name in names:
                tensors[name] = tensors[name].clone()
                delta.update_tensor(name, tensors[name], revert=revert)
        chain = json.loads(meta.get(CHAIN, "[]"))
        if revert:
            chain = [c for c in chain if c["id"] != me]
        else:
            chain.append({"id": me, "tensors": names, "instance_id": delta.metadata.get("instance_id", "")})
        meta[CHAIN] = json.dumps(chain)
    return weight_map, index, shards


def _write_shard(path: str, tensors: dict, meta: dict) -> None:
    save_file(tensors, path, metadata=meta)
    _step("write")
    _fsync(path)
    _step("fsync")


def apply_to_folder(delta: Delta, folder: str, output: str | None = None, *, revert: bool = False,
                    force: bool = False) -> list[str]:
    """Apply (or revert) `delta` on the checkpoint in `folder`: into the new folder `output`, or in place
    when `output` is None. Returns the shard files rewritten. Raises `DeltaError` (nothing written) when a
    check fails."""
    weight_map, index, shards = _plan(delta, folder, revert, force)
    if output is not None:
        _write_new_folder(folder, output, shards)
    elif index is None:
        (shard, (tensors, meta)), = shards.items()
        fd, tmp = tempfile.mkstemp(prefix=".dinm-", suffix=".safetensors.tmp", dir=folder)
        os.close(fd)
        try:
            _write_shard(tmp, tensors, meta)
            os.replace(tmp, os.path.join(folder, shard))
            _step("replace")
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    else:
        _in_place_sharded(folder, index, weight_map, shards)
    _fsync(output or folder)
    return sorted(shards)


def _write_new_folder(folder: str, output: str, shards: dict) -> None:
    if os.path.exists(output):
        raise DeltaError(f"output folder `{output}` exists; choose a new folder")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise DeltaError(f"output folder `{output}`: parent folder `{parent}` does not exist")
    tmp = tempfile.mkdtemp(prefix=".dinm-", dir=parent)
    try:
        for entry in os.listdir(folder):
            src, dst = os.path.join(folder, entry), os.path.join(tmp, entry)
            if entry in shards:
                _write_shard(dst, *shards[entry])
            elif os.path.isdir(src):
                shutil.copytree(src, dst)
            else:
                try:
                    os.link(src, dst)  # files never change in place (see above), so sharing them is safe
                except OSError:
                    shutil.copy2(src, dst)
        os.rename(tmp, output)
        _step("rename")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _in_place_sharded(folder: str, index: str, weight_map: dict, shards: dict) -> None:
    with open(index, encoding="utf-8") as f:
        index_data = json.load(f)
    renamed, written = {}, []
    try:
        for shard, (tensors, meta) in shards.items():
            tag = hashlib.sha256(meta[CHAIN].encode() + shard.encode()).hexdigest()[:12]
            new = _SUFFIX.sub("", shard).removesuffix(".safetensors") + f".dinm-{tag}.safetensors"
            tmp = os.path.join(folder, f".{new}.tmp")
            written.append(tmp)
            _write_shard(tmp, tensors, meta)
            os.replace(tmp, os.path.join(folder, new))
            written[-1] = os.path.join(folder, new)
            _step("rename shard")
            renamed[shard] = new
        index_data["weight_map"] = {k: renamed.get(v, v) for k, v in weight_map.items()}
        fd, tmp = tempfile.mkstemp(prefix=".dinm-", suffix=".json.tmp", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(index_data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        written.append(tmp)
        _step("write index")
        os.replace(tmp, index)  # the commit point
        written.clear()
        _step("replace index")
    except BaseException:
        for path in written:  # before the commit point: the new files are not referenced; remove them
            if os.path.exists(path):
                os.remove(path)
        raise
    for old in renamed:
        os.remove(os.path.join(folder, old))
        _step("remove old shard")


def chain(folder: str) -> list[dict]:
    """The deltas applied to the checkpoint in `folder`, per rewritten shard, oldest first."""
    weight_map, _ = layout(folder)
    out = []
    for shard in sorted(set(weight_map.values())):
        with safe_open(os.path.join(folder, shard), framework="pt") as f:
            for entry in json.loads((f.metadata() or {}).get(CHAIN, "[]")):
                out.append({"shard": shard, **entry})
    return out
