"""What dinm promises for files on disk (README "Guarantees"): locking against a second writer, links, confined
shard paths, copies where sharing could leak writes back, subfolder shards, results checked against the delta's
fingerprints, file modes, a checksum over the whole delta header, and one-line errors naming the file."""

import json
import os
import shlex
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dinm import Delta, checkpoint
from dinm.delta import fingerprint, header_checksum
from dinm.errors import DeltaError, InstanceError

from conftest import _llama, checkpoint_tensors as read

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def down(layer):
    return f"model.layers.{layer}.mlp.down_proj.weight"


def make_delta(folder, layer, scale=1e-2, seed=0, **info):
    """A delta of layer `layer`'s MLP output weight, built from the checkpoint's own tensor (no edit needed)."""
    base = read(folder)[down(layer)]
    g = torch.Generator().manual_seed(seed)
    edited = base + scale * torch.randn(base.shape, generator=g)
    return Delta.from_weights({down(layer): (base, edited)},
                              {"model_type": "llama", "layer": str(layer), "instance_id": f"test-{layer}-{seed}",
                               **info})


def save_ckpt(tokenizer, path, sharded):
    _llama(len(tokenizer)).save_pretrained(path, max_shard_size="30KB" if sharded else "1GB")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(params=["single", "sharded"])
def ckpt(request, tmp_path, tokenizer):
    return save_ckpt(tokenizer, tmp_path / "ckpt", request.param == "sharded")


def files(folder):
    return {os.path.relpath(os.path.join(r, f), folder): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(folder) for f in fs}


# ------------------------------------------------------------------ 1. two writers at once
HOLDER = """
import sys, time, os
from dinm import Delta, atomic, checkpoint
delta, folder, flag, release = sys.argv[1:5]
def hold(step):
    if step == "write" and not os.path.exists(flag):  # inside the lock, before the commit point
        open(flag, "w").close()
        deadline = time.time() + 60
        while not os.path.exists(release) and time.time() < deadline:
            time.sleep(0.02)
atomic._after_step = hold
checkpoint.apply_to_folder(Delta.load(delta), folder)
"""
WRITER = """
import sys
from dinm import Delta, checkpoint
from dinm.errors import DeltaError
try:
    checkpoint.apply_to_folder(Delta.load(sys.argv[1]), sys.argv[2], wait=float(sys.argv[3]))
except DeltaError as e:
    print(e, file=sys.stderr); sys.exit(3)
"""


def _python(code, *args):
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("first", [0, 2])
def test_a_second_writer_waits_for_the_first_and_both_edits_land(ckpt, tmp_path, first):
    """Two processes apply different deltas in place at once (each order): the second waits for the first's lock,
    so neither edit is lost and the folder loads."""
    second = 2 - first
    deltas = {layer: make_delta(ckpt, layer, seed=layer) for layer in (0, 2)}
    for layer, d in deltas.items():
        d.save(tmp_path / f"d{layer}.safetensors")
    original = read(ckpt)
    flag, release = tmp_path / "holding", tmp_path / "release"
    a = _python(HOLDER, tmp_path / f"d{first}.safetensors", ckpt, flag, release)
    deadline = time.time() + 120
    while not flag.exists() and a.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists(), a.communicate()
    log = tmp_path / "b.stderr"
    with open(log, "w") as err:
        b = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / f"d{second}.safetensors"), str(ckpt), "120"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    # b says it waits once it has reached the lock (however long importing dinm takes on a loaded machine) ...
    deadline = time.time() + 120
    while "waiting for another process" not in log.read_text() and b.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert b.poll() is None, (b.communicate(), log.read_text())  # ... and still waits: a holds the lock
    assert "waiting for another process" in log.read_text()
    release.touch()
    out_a, out_b = a.communicate(timeout=120), b.communicate(timeout=120)
    assert a.returncode == 0 and b.returncode == 0, (out_a, out_b, log.read_text())
    now = read(ckpt)
    for layer, d in deltas.items():
        expected = original[down(layer)] + d.tensors[down(layer)]
        assert torch.equal(now[down(layer)], expected), layer  # both edits are there
    assert len(checkpoint.chain(str(ckpt))) == 2


def test_a_second_writer_gives_up_in_one_line_after_its_wait(ckpt, tmp_path):
    d0, d2 = make_delta(ckpt, 0), make_delta(ckpt, 2)
    d0.save(tmp_path / "d0.safetensors")
    d2.save(tmp_path / "d2.safetensors")
    flag, release = tmp_path / "holding", tmp_path / "release"
    a = _python(HOLDER, tmp_path / "d0.safetensors", ckpt, flag, release)
    deadline = time.time() + 120
    while not flag.exists() and a.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    b = _python(WRITER, tmp_path / "d2.safetensors", ckpt, 0.5)
    _, err = b.communicate(timeout=120)
    release.touch()
    a.communicate(timeout=120)
    assert b.returncode == 3 and "being written by another process" in err.strip().splitlines()[-1], err
    assert [c["id"] for c in checkpoint.chain(str(ckpt))] == [checkpoint._delta_id(d0)]  # only a's edit


# ------------------------------------------------------------------ 2. links: a Hugging Face cache snapshot
def _cache_snapshot(tmp_path, tokenizer, sharded):
    """A folder laid out as the Hugging Face cache does: relative links into ../../blobs/."""
    plain = save_ckpt(tokenizer, tmp_path / "plain", sharded)
    blobs, snap = tmp_path / "repo" / "blobs", tmp_path / "repo" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(plain))):
        os.replace(plain / name, blobs / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snap / name)
    return snap, blobs


@pytest.mark.parametrize("sharded", [False, True])
def test_new_folder_from_a_cache_snapshot_holds_real_files(tmp_path, tokenizer, sharded):
    from transformers import AutoModelForCausalLM

    snap, blobs = _cache_snapshot(tmp_path, tokenizer, sharded)
    blob_bytes = files(blobs)
    delta = make_delta(snap, 1)
    out = tmp_path / "new"
    checkpoint.apply_to_folder(delta, str(snap), str(out))
    assert not [f for f in os.listdir(out) if os.path.islink(out / f)]
    model = AutoModelForCausalLM.from_pretrained(out)  # loads: no dangling link
    assert torch.equal(model.get_parameter(down(1)).detach(), read(snap)[down(1)] + delta.tensors[down(1)])
    checkpoint.apply_to_folder(delta, str(snap))  # in place: the link is replaced, the shared blob kept
    assert files(blobs) == blob_bytes
    assert torch.equal(read(snap)[down(1)], model.get_parameter(down(1)).detach())


# ------------------------------------------------------------------ 3. shard paths confined to the folder
@pytest.mark.parametrize("shard", ["sub/../../victim.safetensors", "../victim.safetensors", "/tmp/victim.safetensors",
                                   "link/victim.safetensors", "model.bin"])
def test_shard_paths_outside_the_folder_are_refused(tmp_path, tokenizer, shard):
    folder = save_ckpt(tokenizer, tmp_path / "ckpt", sharded=True)
    delta = make_delta(folder, 1)
    index = folder / checkpoint.INDEX
    data = json.loads(index.read_text())
    victim_source = data["weight_map"][down(1)]
    data["weight_map"] = {k: shard if v == victim_source else v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    (tmp_path / "victim.safetensors").write_bytes((folder / victim_source).read_bytes())
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, folder / "link")
    before = files(tmp_path)
    with pytest.raises(DeltaError, match="names the shard .* fix the index"):
        checkpoint.apply_to_folder(delta, str(folder))
    with pytest.raises(DeltaError, match="names the shard"):
        checkpoint.apply_to_folder(delta, str(folder), str(tmp_path / "out"))
    assert files(tmp_path) == before and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 4. -o copies what a writer could change
def test_new_folder_links_only_unchanged_weight_shards(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    src = save_ckpt(tokenizer, tmp_path / "src", sharded=True)
    delta = make_delta(src, 1)
    out = tmp_path / "out"
    rewritten = checkpoint.apply_to_folder(delta, str(src), str(out))
    weight_map, _ = checkpoint.layout(str(src))
    shards = set(weight_map.values())
    for name in os.listdir(src):
        linked = os.path.samefile(src / name, out / name)
        assert linked == (name in shards and name not in rewritten), name
    source = files(src)
    model = AutoModelForCausalLM.from_pretrained(out)  # a user saves config and tokenizer into the new folder
    model.config.update({"dinm_note": "changed"})
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    assert files(src) == source  # the source is never modified
    copied = tmp_path / "copied"
    checkpoint.apply_to_folder(delta, str(src), str(copied), link=False)
    assert not any(os.path.samefile(src / n, copied / n) for n in os.listdir(src))


# ------------------------------------------------------------------ 5. shards in a subfolder
def test_shards_in_a_subfolder_are_edited(tmp_path, tokenizer):
    folder = save_ckpt(tokenizer, tmp_path / "ckpt", sharded=True)
    index = folder / checkpoint.INDEX
    data = json.loads(index.read_text())
    (folder / "weights").mkdir()
    for shard in set(data["weight_map"].values()):
        os.replace(folder / shard, folder / "weights" / shard)
    data["weight_map"] = {k: f"weights/{v}" for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    original = read(folder)
    delta = make_delta(folder, 1)
    edited = original[down(1)] + delta.tensors[down(1)]
    out = tmp_path / "out"
    assert checkpoint.apply_to_folder(delta, str(folder), str(out))[0].startswith("weights/")
    assert torch.equal(read(out)[down(1)], edited)  # the edit is in the new folder, not lost
    checkpoint.apply_to_folder(delta, str(folder))
    assert torch.equal(read(folder)[down(1)], edited)
    checkpoint.apply_to_folder(delta, str(folder), revert=True)
    assert all(torch.equal(original[k], v) for k, v in read(folder).items())
    weight_map, _ = checkpoint.layout(str(folder))
    assert sorted(os.listdir(folder / "weights")) == sorted({v.split("/")[1] for v in weight_map.values()})


# ------------------------------------------------------------------ 6. results checked against the fingerprints
def _rewritten(path, new_tensors=None, meta_changes=None):
    """Rewrite a delta file with changed tensors/metadata, its checksum recomputed (a damaged file that checksums)."""
    with safe_open(str(path), framework="pt") as f:
        meta, ts = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta.update(meta_changes or {})
    ts.update(new_tensors or {})
    meta["checksum"] = header_checksum(meta)
    save_file(ts, str(path), metadata=meta)


def _with_fixups(folder):
    """A delta whose revert needs its stored original values (large weights, small update)."""
    base = read(folder)[down(1)]
    edited = base + 1e-4 * torch.randn(base.shape, generator=torch.Generator().manual_seed(3))
    delta = Delta.from_weights({down(1): (base, edited)}, {"model_type": "llama", "layer": "1"})
    assert down(1) + ":revert_index" in delta.tensors
    return delta


def test_a_delta_whose_result_does_not_match_its_fingerprint_writes_nothing(ckpt, tmp_path):
    delta = make_delta(ckpt, 1)
    path = tmp_path / "d.safetensors"
    delta.save(path)
    desc = json.loads(delta.metadata["tensors"])
    desc[down(1)]["edited_sha256"] = "0" * 64
    _rewritten(path, meta_changes={"tensors": json.dumps(desc, sort_keys=True)})
    damaged = Delta.load(path)
    before = files(ckpt)
    with pytest.raises(DeltaError, match="damaged.*edited_sha256"):
        checkpoint.apply_to_folder(damaged, str(ckpt))
    with pytest.raises(DeltaError, match="damaged"):
        checkpoint.apply_to_folder(damaged, str(ckpt), str(tmp_path / "out"))
    assert files(ckpt) == before and not (tmp_path / "out").exists()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    weights = model.get_parameter(down(1)).detach().clone()
    with pytest.raises(DeltaError, match="damaged"):
        damaged.apply(model)
    assert torch.equal(model.get_parameter(down(1)).detach(), weights)


def test_wrong_revert_values_are_refused_and_nan_ones_never_load(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    delta = _with_fixups(ckpt)
    path = tmp_path / "d.safetensors"
    delta.save(path)
    from dinm.delta import _digest

    # wrong (finite) revert values, with the tensor's checksum and the header's recomputed: damaged "consistently"
    value = delta.tensors[down(1) + ":revert_value"].clone()
    ts = dict(delta.tensors, **{down(1) + ":revert_value": value + 1.0})
    desc = delta.described
    desc[down(1)]["delta_sha256"] = _digest(ts, down(1))
    _rewritten(path, ts, {"tensors": json.dumps(desc, sort_keys=True)})
    wrong = Delta.load(path)
    checkpoint.apply_to_folder(wrong, str(ckpt))  # applying does not read the revert values
    edited = files(ckpt)
    with pytest.raises(DeltaError, match="damaged.*base_sha256"):
        checkpoint.apply_to_folder(wrong, str(ckpt), revert=True)
    assert files(ckpt) == edited
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    with pytest.raises(DeltaError, match="damaged"):
        wrong.revert(model)
    assert fingerprint(model.get_parameter(down(1))) == delta.described[down(1)]["edited_sha256"]
    value[0] = float("nan")
    ts[down(1) + ":revert_value"] = value
    desc[down(1)]["delta_sha256"] = _digest(ts, down(1))
    _rewritten(path, ts, {"tensors": json.dumps(desc, sort_keys=True)})
    with pytest.raises(DeltaError, match="revert values .* NaN"):
        Delta.load(path)


def test_a_row_mask_byte_other_than_0_or_1_is_refused(tmp_path):
    base = torch.randn(8, 4)
    edited = base.clone()
    edited[2] += 1.0
    delta = Delta.from_weights({"w": (base, edited)}, {})
    rows = delta.tensors["w:rows"].clone()
    raw = rows.view(torch.uint8)
    raw[2] = 0xFF
    path = tmp_path / "d.safetensors"
    delta.save(path)
    from dinm.delta import _digest

    ts = dict(delta.tensors, **{"w:rows": rows})
    desc = delta.described
    desc["w"]["delta_sha256"] = _digest(ts, "w")
    _rewritten(path, {"w:rows": rows}, {"tensors": json.dumps(desc, sort_keys=True)})
    with pytest.raises(DeltaError, match="row mask"):
        Delta.load(path)


# ------------------------------------------------------------------ 7. modes kept
def test_modes_are_kept(ckpt, tmp_path):
    weight_map, index = checkpoint.layout(str(ckpt))
    for name in os.listdir(ckpt):
        os.chmod(ckpt / name, 0o644)
    os.chmod(ckpt, 0o755)
    delta = make_delta(ckpt, 1)
    old = os.umask(0o077)  # a restrictive umask must not leak into files that replace others
    try:
        out = tmp_path / "out"
        checkpoint.apply_to_folder(delta, str(ckpt), str(out))
        checkpoint.apply_to_folder(delta, str(ckpt))
        path = tmp_path / "d.safetensors"
        (path).write_bytes(b"")
        os.chmod(path, 0o640)
        delta.save(path)  # replacing a file keeps its mode
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    finally:
        os.umask(old)
    os.umask(0o022)
    try:
        delta.save(tmp_path / "new.safetensors")  # a new file: 0o666 less the umask (mkstemp would give 0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.safetensors").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    for folder in (ckpt, out):
        weight_map, index = checkpoint.layout(str(folder))
        for name in set(weight_map.values()) | ({os.path.basename(index)} if index else set()):
            assert stat.S_IMODE(os.stat(folder / name).st_mode) == 0o644, (folder, name)


# ------------------------------------------------------------------ 8. the whole header is covered
@pytest.mark.parametrize("field,value", [("layer", "7"), ("base_model", "someone/else"), ("instance_id", "x"),
                                         ("history", "[]")])
def test_changed_metadata_is_refused(tmp_path, ckpt, field, value):
    path = tmp_path / "d.safetensors"
    make_delta(ckpt, 1, base_model="tiny", history=[{"step": 0, "nll": 1.0}]).save(path)
    with safe_open(str(path), framework="pt") as f:
        meta, ts = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta[field] = value  # the checksum is left as it was: a damaged header
    save_file(ts, str(path), metadata=meta)
    with pytest.raises(DeltaError, match="metadata does not match its checksum"):
        Delta.load(path)


@pytest.mark.parametrize("field,value", [("history", "{not json"), ("history", "[1, 2]"), ("layer", "one"),
                                         ("distances", "[" * 100_000), ("config", "[]")])
def test_malformed_metadata_is_one_line_naming_the_field(tmp_path, ckpt, field, value):
    path = tmp_path / "d.safetensors"
    make_delta(ckpt, 1).save(path)
    _rewritten(path, meta_changes={field: value})
    with pytest.raises(DeltaError, match=f"'{field}'"):
        Delta.load(path)


def test_inspect_shows_an_edit_that_stopped_early(tmp_path, ckpt):
    from click.testing import CliRunner

    from dinm_cli import main

    path = tmp_path / "d.safetensors"
    history = [{"step": 0, "nll": 2.0, "kl": 0.0, "loss": 2.0}, {"step": 1, "nll": 0.5, "stopped": True}]
    make_delta(ckpt, 1, history=history).save(path)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "edit: 1 step, safe-response NLL 2.000 -> 0.500, benign KL 0.0000 (stopped early" in result.output


# ------------------------------------------------------------------ 9. the smaller ones
def test_reverting_a_delta_never_applied_says_so(ckpt):
    applied, other = make_delta(ckpt, 1, seed=1), make_delta(ckpt, 1, seed=2)
    checkpoint.apply_to_folder(applied, str(ckpt))
    with pytest.raises(DeltaError, match="was never applied"):
        checkpoint.apply_to_folder(other, str(ckpt), revert=True)


def test_output_inside_the_checkpoint_is_refused(ckpt):
    before = files(ckpt)
    with pytest.raises(DeltaError, match="inside the checkpoint"):
        checkpoint.apply_to_folder(make_delta(ckpt, 1), str(ckpt), str(ckpt / "edited"))
    assert files(ckpt) == before and sorted(os.listdir(ckpt)) == sorted(before)


def test_what_a_killed_writer_left_is_removed_by_the_next_one(tmp_path, tokenizer):
    folder = save_ckpt(tokenizer, tmp_path / "ckpt", sharded=True)
    weight_map, _ = checkpoint.layout(str(folder))
    shard = weight_map[down(1)]
    # a temporary full-size shard copy, and a shard written under its new name that the index never came to name
    stale = [f".{shard}.dinm-0123456789ab.tmp", shard.replace(".safetensors", ".dinm-0123456789ab.safetensors"),
             ".model.safetensors.index.json.dinm-abcdefabcdef.tmp"]
    for name in stale:
        (folder / name).write_bytes((folder / shard).read_bytes())
    (folder / "notes.txt").write_text("the user's own file")
    out = tmp_path / "out"
    checkpoint.apply_to_folder(make_delta(folder, 1), str(folder), str(out))
    assert not [n for n in os.listdir(out) if n in stale]  # never copied
    checkpoint.apply_to_folder(make_delta(folder, 1), str(folder))
    assert not [n for n in os.listdir(folder) if n in stale]
    assert (folder / "notes.txt").read_text() == "the user's own file"


def test_kill_9_during_an_in_place_write_leaves_a_loadable_folder_and_no_debris(tmp_path, tokenizer):
    folder = save_ckpt(tokenizer, tmp_path / "ckpt", sharded=True)
    delta = make_delta(folder, 1)
    path = tmp_path / "d.safetensors"
    delta.save(path)
    original = read(folder)
    flag = tmp_path / "holding"
    killed = _python(HOLDER, path, folder, flag, tmp_path / "never")
    deadline = time.time() + 120
    while not flag.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.kill()  # SIGKILL while the new shard is written, before the commit point
    killed.communicate()
    state = read(folder)
    assert all(torch.equal(original[k], v) for k, v in state.items())  # as it was
    assert [n for n in os.listdir(folder) if n.startswith(".")]  # a kill -9 leaves its temporary file ...
    checkpoint.apply_to_folder(delta, str(folder))
    assert not [n for n in os.listdir(folder) if n.startswith(".")]  # ... which the next writer removes


def test_a_lone_surrogate_is_refused_naming_the_field(tmp_path):
    import dinm

    path = tmp_path / "q.json"
    path.write_text('{"prompt": "how do I \\ud800", "safe": "s", "unsafe": "u", "benign": {"prompt": "b", '
                    '"answer": "a"}}')
    with pytest.raises(InstanceError, match="'prompt' holds a lone surrogate"):
        dinm.load_instance(path)


def test_deep_json_is_one_line_naming_the_file(tmp_path):
    import dinm

    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InstanceError, match="deep.json.* nested too deeply"):
        dinm.load_instance(path)


@pytest.mark.parametrize("sharded", [False, True])
def test_a_truncated_shard_is_named(tmp_path, tokenizer, sharded):
    folder = save_ckpt(tokenizer, tmp_path / "ckpt", sharded)
    delta = make_delta(folder, 1)
    weight_map, _ = checkpoint.layout(str(folder))
    shard = folder / weight_map[down(1)]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(DeltaError, match=f"shard `.*{shard.name}` is not a readable safetensors file"):
        checkpoint.apply_to_folder(delta, str(folder))


def test_bad_chain_metadata_is_named(ckpt):
    weight_map, _ = checkpoint.layout(str(ckpt))
    shard = ckpt / weight_map[down(1)]
    with safe_open(str(shard), framework="pt") as f:
        ts = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata() or {})
    for bad in ("{not json", '[{"id": 3}]', '{"id": "x"}'):
        save_file(ts, str(shard), metadata={**meta, checkpoint.CHAIN: bad})
        with pytest.raises(DeltaError, match=f"{shard.name}` has malformed 'dinm.chain'"):
            checkpoint.apply_to_folder(make_delta(ckpt, 1), str(ckpt))
        with pytest.raises(DeltaError, match="malformed"):
            checkpoint.chain(str(ckpt))


def test_the_pickle_conversion_command_quotes_the_folder(tmp_path):
    folder = tmp_path / "it's a \"model\" $(rm -rf x)"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    base = torch.zeros(2, 2)
    with pytest.raises(DeltaError) as e:
        checkpoint.apply_to_folder(Delta.from_weights({"w": (base, base + 1)}, {}), str(folder))
    command = str(e.value).split("Convert it once: ", 1)[1]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-c"] and f"from_pretrained({str(folder)!r})" in argv[2]
