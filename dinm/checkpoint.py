"""Apply and revert deltas on Hugging Face checkpoint folders on disk, without loading the model.

Only the shard(s) holding the delta's tensors are read and rewritten. What is promised (README "Guarantees"):

* **Checked before anything is written.** Fingerprints, shapes, dtypes and the chain of deltas applied are checked,
  and the *result* is compared with the delta's fingerprint of what it must give (``edited_sha256`` on apply,
  ``base_sha256`` on revert) before the commit point: a damaged delta writes nothing.
* **Locked.** An in-place write holds an exclusive lock on the folder (`dinm.atomic.locked`) from reading the shards
  to the commit point; a reader for ``output=`` holds a shared one. A second writer waits, then fails in one line.
* **Atomic.** Into a new folder (``output=``) the folder is built under a temporary name and renamed whole. In
  place, nothing is ever written into an existing file: a single ``model.safetensors`` is replaced by rename; in a
  sharded folder each rewritten shard is written under a new name and the index (the only file that says which
  shard holds what) is replaced last. A crash at any point leaves the folder loadable and either as it was or fully
  edited; the temporary files a kill -9 leaves are removed by the next in-place write.
* **Confined.** Every shard the index names must lie inside the folder (no absolute paths, no ``..``, no subfolder
  that is a link leading out); shards in subfolders are handled.
* **Links.** Files that are links (a Hugging Face cache snapshot) are read through; a new folder holds real files.
  Into a new folder only unchanged weight shards are hard-linked (``link=False`` copies them too); every other file
  is copied, so writing into the new folder can never change the source's configuration or tokenizer.
* **Modes.** A rewritten file keeps the mode of the file it replaces; a new folder takes the source's.

Each rewritten shard records the deltas applied to it, in order (metadata key ``dinm.chain``), so that a revert
out of order is refused with the delta to revert first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import atomic
from .atomic import step
from .delta import Delta, _dtype_name, fingerprint, mismatch
from .errors import DeltaError, first_line

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE = ("pytorch_model.bin", "pytorch_model.bin.index.json")
CHAIN = "dinm.chain"
_SUFFIX = re.compile(r"\.dinm-[0-9a-f]{12}(?=\.safetensors$)")


def _load_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DeltaError(f"{what} `{path}` is unreadable ({first_line(e)}); restore it from the original") from None


def _confined(folder: str, shard, index: str) -> str:
    """`shard` (a name from the index) as a normalised relative path inside `folder`; refused otherwise."""
    parts = shard.split("/") if isinstance(shard, str) else []
    if (not parts or os.path.isabs(shard) or "\\" in shard or "\0" in shard
            or any(p in ("", ".", "..") for p in parts) or not shard.endswith(".safetensors")):
        raise DeltaError(f"checkpoint index `{index}` names the shard {shard!r}, which is not a .safetensors file "
                         f"inside the folder; fix the index")
    root = os.path.realpath(folder)
    where = os.path.realpath(os.path.join(folder, os.path.dirname(shard)))
    if where != root and not where.startswith(root + os.sep):
        raise DeltaError(f"checkpoint index `{index}` names the shard {shard!r}, whose folder leads outside "
                         f"`{folder}`; fix the index")
    return shard


def layout(folder: str) -> tuple[dict[str, str], str | None]:
    """(tensor name -> shard file relative to `folder`, index path or None) of a safetensors checkpoint folder."""
    if not os.path.isdir(folder):
        raise DeltaError(f"checkpoint `{folder}` is not a folder")
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        data = _load_json(index, "checkpoint index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) for k in weight_map):
            raise DeltaError(f"checkpoint index `{index}` has no 'weight_map' object; restore it from the original")
        return {k: _confined(folder, v, index) for k, v in weight_map.items()}, index
    single = os.path.join(folder, SINGLE)
    if os.path.isfile(single):
        try:
            with safe_open(single, framework="pt") as f:
                return {k: SINGLE for k in f.keys()}, None
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise DeltaError(f"shard `{single}` is not a readable safetensors file ({first_line(e)})") from None
    if any(os.path.isfile(os.path.join(folder, p)) for p in PICKLE):
        code = (f"from transformers import AutoModelForCausalLM as M; "
                f"M.from_pretrained({folder!r}).save_pretrained('NEW_FOLDER')")
        raise DeltaError(f"checkpoint `{folder}` is a pickle checkpoint (pytorch_model.bin); dinm reads safetensors "
                         f"only. Convert it once: python -c {shlex.quote(code)}")
    raise DeltaError(f"checkpoint `{folder}` has neither {SINGLE} nor {INDEX}")


def _read_shard(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DeltaError(f"shard `{path}` is not a readable safetensors file ({first_line(e)})") from None


def _chain(meta: dict, path: str) -> list[dict]:
    """The `dinm.chain` metadata of the shard at `path`, validated."""
    try:
        chain = json.loads(meta.get(CHAIN, "[]"))
    except (ValueError, RecursionError):
        chain = None
    if not (isinstance(chain, list) and all(
            isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("tensors"), list)
            and all(isinstance(t, str) for t in c["tensors"]) for c in chain)):
        raise DeltaError(f"shard `{path}` has malformed {CHAIN!r} metadata; restore the shard from the original")
    return chain


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
        path = os.path.join(folder, shard)
        if shard not in shards:
            shards[shard] = _read_shard(path)
        tensors, meta = shards[shard]
        if name not in tensors:
            raise DeltaError(f"shard `{path}` does not hold {name!r}, although the index says it does; "
                             f"restore the checkpoint from the original")
        t = tensors[name]
        if list(t.shape) != desc["shape"] or _dtype_name(t.dtype) != desc["dtype"]:
            raise DeltaError(f"tensor {name!r} is {_dtype_name(t.dtype)}{list(t.shape)} in "
                             f"`{folder}` but {desc['dtype']}{desc['shape']} in the delta")
        touching = [c["id"] for c in _chain(meta, path) if name in c["tensors"]]
        if revert and touching and touching[-1] != me and not force:
            if me not in touching:
                raise DeltaError(f"refusing to revert: delta {me} was never applied to {name!r} in `{folder}` "
                                 f"(applied there: {', '.join(touching)}); check which delta you meant")
            raise DeltaError(f"refusing to revert: delta {touching[-1]} was applied to {name!r} after this "
                             f"one ({me}); revert {touching[-1]} first")
        found = None if force else fingerprint(t)
        why = None if force else mismatch(desc, found, want)
        if why:
            if not revert and touching and found != desc["edited_sha256"]:
                why = (f"delta {touching[-1]} changed it since this delta's base; revert it first, or "
                       f"make this delta on the edited model")
            raise DeltaError(f"refusing to {'revert' if revert else 'apply'}: tensor {name!r} in `{folder}` does not "
                             f"match: {why}; pass --force to override")
    for shard, (tensors, meta) in shards.items():
        names = [n for n in delta.described if weight_map[n] == shard]
        for name in names:
            tensors[name] = delta.updated(name, tensors[name], revert=revert, check=not force)
        chain = _chain(meta, os.path.join(folder, shard))
        if revert:
            chain = [c for c in chain if c["id"] != me]
        else:
            chain.append({"id": me, "tensors": names, "instance_id": delta.metadata.get("instance_id", "")})
        meta[CHAIN] = json.dumps(chain)
    return weight_map, index, shards


def _write_shard(path: str, tensors: dict, meta: dict, mode: int | None) -> None:
    """Write a shard to `path` (a new name, or one to replace) whole or not at all, with `mode`."""
    with atomic.replacing(path, mode) as tmp:
        save_file(tensors, tmp, metadata=meta)
        step("write")


def apply_delta(delta: Delta, target, output: str | os.PathLike | None = None, *, revert: bool = False,
                force: bool = False, link: bool = True, tokenizer=None, wait: float = atomic.LOCK_WAIT) -> list[str]:
    """Apply (or, with `revert`, revert) `delta` to `target`, whichever form the model has:

    * a checkpoint folder (a path): edited on disk without loading the model (`apply_to_folder`), into the new
      folder `output` or in place when `output` is None;
    * a loaded model: edited in memory (`Delta.apply` / `Delta.revert`) and, when `output` is given, saved there
      (with `tokenizer`, if given) as a safetensors checkpoint, whole or not at all; if saving fails the model is
      changed back.

    Returns the files written: the shards rewritten, `[output]` for a saved model, `[]` for one edited in memory.
    Raises `DeltaError` when a check fails; nothing is written or changed then.
    """
    output = None if output is None else os.fspath(output)
    if isinstance(target, (str, os.PathLike)):
        return apply_to_folder(delta, os.fspath(target), output, revert=revert, force=force, link=link, wait=wait)
    change = delta.revert if revert else delta.apply
    if output is None:
        change(target, force=force)
        return []
    atomic.check_new_folder(output)
    undo = delta.undoer(target, revert=revert, force=force)  # (before the change: with force, a copy of now)
    change(target, force=force)
    try:
        with atomic.new_folder(output) as tmp:
            target.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    except BaseException as e:
        undo()  # the model is as it was
        if isinstance(e, OSError):
            raise DeltaError(f"could not write `{output}` ({first_line(e)}); nothing was written") from None
        raise
    return [output]


def apply_to_folder(delta: Delta, folder: str, output: str | None = None, *, revert: bool = False,
                    force: bool = False, link: bool = True, wait: float = atomic.LOCK_WAIT) -> list[str]:
    """Apply (or revert) `delta` on the checkpoint in `folder`: into the new folder `output`, or in place
    when `output` is None. Returns the shard files rewritten. Raises `DeltaError` (nothing written) when a
    check fails. `link=False` copies the unchanged weight shards into `output` instead of hard-linking them;
    `wait` is how long to wait for another process writing `folder`."""
    if not os.path.isdir(folder):
        raise DeltaError(f"checkpoint `{folder}` is not a folder")
    if output is not None:
        _check_output(folder, output)
    try:
        with atomic.locked(folder, shared=output is not None, wait=wait):
            weight_map, index, shards = _plan(delta, folder, revert, force)
            if output is None:
                _remove_stale(folder, weight_map, index)
            if output is not None:
                _write_new_folder(folder, output, weight_map, shards, link)
            elif index is None:
                (shard, (tensors, meta)), = shards.items()
                _write_shard(os.path.join(folder, shard), tensors, meta, None)
            else:
                _in_place_sharded(folder, index, weight_map, shards)
    except (OSError, SafetensorError) as e:
        raise DeltaError(f"could not write {'`' + output + '`' if output else 'into `' + folder + '`'} "
                         f"({first_line(e)}); the checkpoint is as it was") from None
    return sorted(shards)


def _check_output(folder: str, output: str) -> None:
    atomic.check_new_folder(output)
    source = os.path.realpath(folder)
    parent = os.path.realpath(os.path.dirname(os.path.abspath(output)))
    if parent == source or parent.startswith(source + os.sep):
        raise DeltaError(f"output folder `{output}` is inside the checkpoint `{folder}`; choose a folder outside it")


def _remove_stale(folder: str, weight_map: dict, index: str | None) -> None:
    """With the exclusive lock held: remove what a killed writer left in the folders of the shards (temporary files,
    and, in a sharded checkpoint, shards written under a new name that the index never came to name)."""
    referenced = set(weight_map.values())
    for sub in {""} | {shard.rpartition("/")[0] for shard in referenced}:  # "": the index's own temporary file
        atomic.remove_stale(os.path.join(folder, sub))
        for name in os.listdir(os.path.join(folder, sub)) if index else ():
            rel = f"{sub}/{name}" if sub else name
            if _SUFFIX.search(name) and rel not in referenced and os.path.isfile(os.path.join(folder, rel)):
                os.remove(os.path.join(folder, rel))


def _write_new_folder(folder: str, output: str, weight_map: dict, shards: dict, link: bool) -> None:
    weights = set(weight_map.values())
    seen = set()
    with atomic.new_folder(output, atomic.mode_of(folder)) as tmp:
        for root, dirs, files in os.walk(folder, followlinks=True):
            real = os.path.realpath(root)
            if real in seen:  # a link back up the tree
                dirs.clear()
                continue
            seen.add(real)
            rel = os.path.relpath(root, folder)
            dirs[:] = [d for d in dirs if not atomic.is_temporary(d)]
            for d in dirs:
                os.mkdir(os.path.join(tmp, rel, d), atomic.mode_of(os.path.join(root, d)) or 0o777)
            for name in files:
                path = os.path.normpath(os.path.join(rel, name)).replace(os.sep, "/")
                if atomic.is_temporary(name) or (_SUFFIX.search(name) and path not in weights):
                    continue  # what a killed writer left in the source
                src = os.path.realpath(os.path.join(root, name))  # a cache snapshot's link: its blob
                dst = os.path.join(tmp, path)
                if not os.path.isfile(src):
                    raise DeltaError(f"`{os.path.join(root, name)}` is a broken link; repair the checkpoint first")
                if path in shards:
                    _write_shard(dst, *shards[path], atomic.mode_of(src))
                elif path in weights and link:
                    try:
                        os.link(src, dst)  # unchanged weights: never written by dinm, shared to save the space
                    except OSError:
                        shutil.copy2(src, dst)
                else:
                    shutil.copy2(src, dst)  # configuration, tokenizer, ...: a copy, never shared with the source
                step("write")
        missing = [s for s in shards if not os.path.isfile(os.path.join(tmp, s))]
        if missing:  # the walk must have written every rewritten shard; never a silent lost edit
            raise DeltaError(f"could not place the rewritten shard(s) {missing} in `{output}`; nothing was written")


def _in_place_sharded(folder: str, index: str, weight_map: dict, shards: dict) -> None:
    index_data = _load_json(index, "checkpoint index")
    renamed = {}
    try:
        for shard, (tensors, meta) in shards.items():
            tag = hashlib.sha256(meta[CHAIN].encode() + shard.encode()).hexdigest()[:12]
            renamed[shard] = _SUFFIX.sub("", shard).removesuffix(".safetensors") + f".dinm-{tag}.safetensors"
            _write_shard(os.path.join(folder, renamed[shard]), tensors, meta,
                         atomic.mode_of(os.path.join(folder, shard)))
            step("rename shard")
        index_data["weight_map"] = {k: renamed.get(v, v) for k, v in weight_map.items()}
        with atomic.replacing(index) as tmp:  # the commit point: the index names the new shards
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(index_data, f, indent=2)
            step("write index")
        step("replace index")
    except BaseException:
        # Remove the new shards unless the index on disk already names them (an error after the commit point).
        on_disk = _load_json(index, "checkpoint index").get("weight_map", {})
        for new in renamed.values():
            if new not in on_disk.values() and os.path.exists(os.path.join(folder, new)):
                os.remove(os.path.join(folder, new))
        raise
    for old in renamed:
        os.remove(os.path.join(folder, old))
        step("remove old shard")


def chain(folder: str) -> list[dict]:
    """The deltas applied to the checkpoint in `folder`, per rewritten shard, oldest first."""
    weight_map, _ = layout(folder)
    out = []
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(folder, shard)
        try:
            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise DeltaError(f"shard `{path}` is not a readable safetensors file ({first_line(e)})") from None
        out += [{"shard": shard, **entry} for entry in _chain(meta, path)]
    return out
