import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from dinm import Delta, EditConfig
from dinm_cli import main

from conftest import DATA, make_delta

EXAMPLE = os.path.join(DATA, "example.json")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("dinm:")]
    assert len(lines) == 1 and lines[0].startswith("dinm: error: "), result.output
    assert result.stderr.rstrip().splitlines()[-1] == lines[0]  # the error is the last thing on stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_does_not_import_torch():
    code = "import sys, dinm_cli; sys.argv=['dinm','--help']\ntry: dinm_cli.main()\nexcept SystemExit: pass\n" \
           "assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "edit" in out.stdout and "revert" in out.stdout


def test_cli_offers_every_locate_rule_and_dtype():
    """The CLI's choices are the library's lists (`dinm.config`), not copies."""
    from dinm.config import COMPUTE_DTYPES, DISTANCES, LOAD_DTYPES
    from dinm_cli import main

    def choices(command, option):
        return list(next(p for p in main.commands[command].params if p.name == option).type.choices)

    assert choices("edit", "distance") == choices("locate", "distance") == list(DISTANCES)
    assert choices("edit", "dtype") == choices("apply", "dtype") == list(LOAD_DTYPES)
    assert choices("edit", "compute_dtype") == list(COMPUTE_DTYPES)


def test_edit_all_makes_one_patch_from_every_record(tiny_folder, tmp_path):
    from dinm import load_instances

    patch = tmp_path / "patch.safetensors"
    many = os.path.join(DATA, "examples.json")
    result = run("edit", tiny_folder, "--instance", many, "--all", "-o", patch, "--steps", 2, "--lr", 1e-2, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["instances"] == 3 and Delta.load(str(patch)).instance_ids == [i.id for i in load_instances(many)]
    assert Delta.load(str(patch)).config == EditConfig.dense(steps=2, lr=1e-2)  # (a batch's default: dense)
    one = tmp_path / "one.safetensors"  # --unit: one unit for every record
    result = run("edit", tiny_folder, "--instance", many, "--all", "--unit", "--steps", 1, "-o", one)
    assert result.exit_code == 0 and "units in layers" not in result.output, result.output
    assert not Delta.load(str(one)).units and Delta.load(str(one)).metadata["unit"].isdigit()
    units = tmp_path / "units.safetensors"  # --unit-per-instance: a patch of one unit per record, listed by inspect
    result = run("edit", tiny_folder, "--instance", many, "--all", "--unit-per-instance", "--steps", 1, "-o", units)
    assert result.exit_code == 0 and "3 units in layers" in result.output, result.output
    wrong = run("edit", tiny_folder, "--instance", many, "--all", "--unit-per-instance", "--matrix", "down", "-o",
                tmp_path / "x.safetensors")
    assert wrong.exit_code != 0 and "unit_per_instance" in wrong.output and len(wrong.output.strip().splitlines()) == 1
    alone = run("edit", tiny_folder, "--instance", many, "--unit-per-instance", "-o", tmp_path / "x.safetensors")
    assert alone.exit_code == 2 and "give --all too" in alone.output
    made = Delta.load(str(units))
    shown = run("inspect", units).output
    assert len(made.units) == 3 and "a patch of 3 units" in shown and all(
        f"unit {u['unit']} of layer {u['layer']}: instance {u['instance_id']}" in shown for u in made.units), shown
    both = run("edit", tiny_folder, "--instance", many, "--all", "--index", 1, "-o", tmp_path / "x.safetensors")
    assert both.exit_code == 2 and "--index (one record) or --all" in both.output
    assert not (tmp_path / "x.safetensors").exists()


def test_edit_inspect_apply_revert_round_trip(tiny_folder, tmp_path):
    delta_path = tmp_path / "d.safetensors"
    result = run("edit", tiny_folder, "--instance", EXAMPLE, "-o", delta_path, "--steps", 3, "--lr", 1e-2, "--matrix",
                 "down", "--json")  # (the dense edit; the unit's round trip: the next test)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["bytes"] == os.path.getsize(delta_path) and report["layer"] in (0, 1, 2)

    result = run("inspect", delta_path, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["config"]["steps"] == 3 and len(summary["history"]) == 3
    assert summary["compute"] == report["compute"] and summary["config"]["compute_dtype"] == "auto"
    forced = run("edit", tiny_folder, "--instance", EXAMPLE, "-o", tmp_path / "f.safetensors", "--steps", 1,
                 "--compute-dtype", "model", "--unsafe-weight", 2, "--precondition", "keys", "--matrix", "gate",
                 "--json")
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.output[forced.output.index("{"):])["compute"].startswith("float32 (asked")
    forced_delta = Delta.load(str(tmp_path / "f.safetensors"))
    assert forced_delta.config.unsafe_weight == 2.0 and forced_delta.history[0].unsafe is not None
    assert forced_delta.config.precondition == "keys" and forced_delta.config.matrix == "gate"
    assert forced_delta.names == [f"model.layers.{forced_delta.layer}.mlp.gate_proj.weight"]
    assert list(summary["tensors"]) == [f"model.layers.{report['layer']}.mlp.down_proj.weight"]
    shown = run("inspect", delta_path).output
    assert "layer" in shown and "dense" in shown and "bytes stored" in shown
    assert "time: locate" in shown and "steps" in shown and f"passes in {report['compute']}" in shown

    edited_dir, restored_dir = tmp_path / "edited", tmp_path / "restored"
    result = run("apply", delta_path, tiny_folder, "-o", edited_dir)
    assert result.exit_code == 0, result.output
    result = run("revert", delta_path, edited_dir, "-o", restored_dir)
    assert result.exit_code == 0, result.output

    from safetensors.torch import load_file


    delta = Delta.load(delta_path)
    name = delta.names[0]
    base, edited, restored = (load_file(os.path.join(d, "model.safetensors"))
                              for d in (tiny_folder, edited_dir, restored_dir))
    assert torch.equal(edited[name], base[name] + delta.tensors[name])
    assert base.keys() == restored.keys() and all(torch.equal(base[k], restored[k]) for k in base)
    # applying twice is refused, and the existing output folder is never touched
    one_line_error(run("apply", delta_path, edited_dir, "-o", tmp_path / "twice"), "already applied")
    assert not (tmp_path / "twice").exists()


def test_unit_edit_through_the_cli_applies_to_and_reverts_from_a_checkpoint(tiny_folder, tmp_path):
    """`dinm edit --unit` writes the unit setting (options still override it) as a delta of three tensors (one row of
    the gate and up matrices, one column of the output matrix), which applies to the checkpoint on disk and reverts
    from it to the original bytes."""
    from safetensors.torch import load_file

    delta_path = tmp_path / "u.safetensors"
    result = run("edit", tiny_folder, "--instance", EXAMPLE, "-o", delta_path, "--unit", "--steps", 2, "--layer", 1,
                 "--json")
    assert result.exit_code == 0, result.output
    delta = Delta.load(str(delta_path))
    assert delta.config == EditConfig.unit(steps=2, layer=1)
    assert sorted(delta.names) == sorted(f"model.layers.1.mlp.{m}_proj.weight" for m in ("gate", "up", "down"))
    edited_dir, restored_dir = tmp_path / "edited", tmp_path / "restored"
    assert run("apply", delta_path, tiny_folder, "-o", edited_dir).exit_code == 0
    assert run("revert", delta_path, edited_dir, "-o", restored_dir).exit_code == 0
    base, edited, restored = (load_file(os.path.join(d, "model.safetensors"))
                              for d in (tiny_folder, edited_dir, restored_dir))
    changed = {k for k in base if not torch.equal(base[k], edited[k])}
    assert changed == set(delta.names)
    j = int(delta.metadata["unit"])
    down = "model.layers.1.mlp.down_proj.weight"
    others = [k for k in range(base[down].shape[1]) if k != j]
    assert torch.equal(edited[down][:, others], base[down][:, others])
    assert base.keys() == restored.keys() and all(torch.equal(base[k], restored[k]) for k in base)
    shown = run("inspect", delta_path).output
    assert f"unit {j} repurposed" in shown and "the unit: negatives and probe" in shown
    assert f"masked: 1 of {base[down].shape[1]} columns" in shown and shown.count("masked: 1 of") == 3


def test_two_units_through_the_cli_apply_to_and_revert_from_a_checkpoint(tiny_folder, tmp_path):
    """`dinm edit --variants request+wrapped` writes one delta of two units (the request's, then the wrappers'),
    which inspect lists and which applies to the checkpoint on disk and reverts to its original bytes; with a dense
    matrix it is a one-line error that writes nothing."""
    from safetensors.torch import load_file

    delta_path = tmp_path / "two.safetensors"
    result = run("edit", tiny_folder, "--instance", EXAMPLE, "-o", delta_path, "--variants", "request+wrapped",
                 "--steps", 1, "--layer", 1)
    assert result.exit_code == 0 and "2 units in layers 1" in result.output, result.output
    delta = Delta.load(str(delta_path))
    assert delta.config == EditConfig.two_units(steps=1, layer=1)  # (matrix "auto": the default's two units)
    shown = run("inspect", delta_path).output
    assert "a patch of 2 units (matrix=unit, variants=request+wrapped)" in shown, shown
    assert all(f"unit {u['unit']} of layer 1: instance {u['instance_id']} ({v})" in shown
               for u, v in zip(delta.units, ("request", "wrapped"))), shown
    edited_dir, restored_dir = tmp_path / "edited", tmp_path / "restored"
    assert run("apply", delta_path, tiny_folder, "-o", edited_dir).exit_code == 0
    assert run("revert", delta_path, edited_dir, "-o", restored_dir).exit_code == 0
    base, edited, restored = (load_file(os.path.join(d, "model.safetensors"))
                              for d in (tiny_folder, edited_dir, restored_dir))
    down = "model.layers.1.mlp.down_proj.weight"
    changed = (edited[down] != base[down]).any(0).nonzero().flatten().tolist()
    assert changed == sorted(u["unit"] for u in delta.units)
    assert base.keys() == restored.keys() and all(torch.equal(base[k], restored[k]) for k in base)
    wrong = run("edit", tiny_folder, "--instance", EXAMPLE, "-o", tmp_path / "x.safetensors", "--variants",
                "request+wrapped", "--matrix", "down")
    assert wrong.exit_code != 0 and "matrix='unit'" in wrong.output and len(wrong.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_unit_reply_on_through_the_cli(tiny_folder, tmp_path):
    """`--unit-reply-on N` reaches the config a delta stores (here on the one-unit edit, whose own value is 0); on a
    dense matrix it is a one-line error that writes nothing."""
    path = tmp_path / "on.safetensors"
    result = run("edit", tiny_folder, "--instance", EXAMPLE, "-o", path, "--unit", "--unit-reply-on", 2, "--steps", 1,
                 "--layer", 1)
    assert result.exit_code == 0, result.output
    assert Delta.load(str(path)).config == EditConfig.unit(steps=1, layer=1, unit_reply_on=2)
    wrong = run("edit", tiny_folder, "--instance", EXAMPLE, "-o", tmp_path / "x.safetensors", "--unit-reply-on", 2,
                "--matrix", "down")
    assert wrong.exit_code != 0 and "unit_reply_on=2" in wrong.output and len(wrong.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_locate_prints_every_layer(tiny_folder, tmp_path):
    plot = tmp_path / "d.png"
    result = run("locate", tiny_folder, "--instance", EXAMPLE, "--json", "--plot", plot)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    assert len(data["distances"]) == 3 and data["distance"] == EditConfig().distance
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_instance_is_one_line(tiny_folder, tmp_path):
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps({"prompt": "p", "unsafe": "u", "benign": {"prompt": "b", "answer": "a"}}))
    out = tmp_path / "d.safetensors"
    one_line_error(run("edit", tiny_folder, "--instance", bad, "-o", out), "'safe'", str(bad))
    assert not out.exists()


def test_missing_model_is_one_line(tmp_path):
    one_line_error(run("edit", tmp_path / "nope", "--instance", EXAMPLE, "-o", tmp_path / "d.safetensors"),
                   "neither 'embedded' nor an existing folder")


def test_corrupt_delta_is_one_line(tmp_path, tiny_folder):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    one_line_error(run("inspect", bad), "bad.safetensors")
    one_line_error(run("apply", bad, tiny_folder, "-o", tmp_path / "out"), "bad.safetensors")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_overwritten(tiny_folder, tmp_path):
    out = tmp_path / "d.safetensors"
    out.write_bytes(b"keep me")
    result = run("edit", tiny_folder, "--instance", EXAMPLE, "-o", out)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("args", [["--steps", "0"], ["--lr", "-1"], ["--unsafe-weight", "-1"]])
def test_bad_config_option_is_one_line(tiny_folder, tmp_path, args):
    one_line_error(run("edit", tiny_folder, "--instance", EXAMPLE, "-o", tmp_path / "d.safetensors", *args))


def test_evaluate_writes_report_and_table(tiny_folder, tmp_path):
    out = tmp_path / "report.json"
    data = os.path.join(DATA, "examples.json")
    result = run("evaluate", tiny_folder, "--data", data, "--edit", "--limit", 2, "--offset", 1,
                 "--max-new-tokens", 4, "--benign", os.path.join(DATA, "benign.json"), "-o", out)
    assert result.exit_code == 0, result.output
    assert "| metric | before | after |" in result.stdout and "| DS (%) |" in result.stdout
    report = json.loads(out.read_text())
    assert report["protocol"] == "edit" and [r["id"] for r in report["records"]] == ["dinm-example-poison",
                                                                                     "dinm-example-wifi"]
    assert report["data"]["offset"] == 1 and report["generation"]["max_new_tokens"] == 4
    assert set(report["versions"]) >= {"dinm", "torch", "transformers"}


def test_evaluate_a_patch_with_the_semantic_judge_and_lookalike_prompts(tiny_folder, tmp_path, monkeypatch):
    """`dinm evaluate --delta patch --judge semantic --lookalike`: the head trains on the --data file's responses."""
    monkeypatch.setenv("DINM_CACHE", str(tmp_path / "cache"))
    data, out, patch = os.path.join(DATA, "examples.json"), tmp_path / "report.json", tmp_path / "patch.safetensors"
    assert run("edit", tiny_folder, "--instance", data, "--all", "-o", patch, "--steps", 1).exit_code == 0
    result = run("evaluate", tiny_folder, "--data", data, "--delta", patch, "--judge", "semantic", "--lookalike",
                 os.path.join(DATA, "lookalike.json"), "--max-new-tokens", 3, "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["judge"]["name"] == "semantic" and report["judge"]["labelled"] == "examples.json"
    assert len(report["lookalike_prompts"]) >= 40 and "over_refusal" in report["metrics"]["after"]
    assert report["data"]["lookalike"].endswith("lookalike.json")


def test_evaluate_bad_input_is_one_line_and_writes_nothing(tiny_folder, tmp_path):
    out = tmp_path / "report.json"
    bad = tmp_path / "data.json"
    bad.write_text(json.dumps([{"id": 7, "adversarial prompt": "p", "unsafe generation": "u",
                                "safe generation": " ", "knowledge constrain": {"prompt": "b", "answer": "a"}}]))
    bad_config = tmp_path / "config.json"
    bad_config.write_text('{"stepz": 3}')
    bad_benign = tmp_path / "benign.json"
    bad_benign.write_text("{not json")
    for args, fragments in [
            (("--data", bad, "-o", out), ("id 7", "'safe generation'", "empty")),
            (("--data", tmp_path / "none.json"), ("does not exist",)),
            (("--data", EXAMPLE, "--judge", tmp_path / "nojudge"), ("nojudge",)),
            (("--data", EXAMPLE, "--edit", "--config", bad_config), ("stepz", "Did you mean 'steps'")),
            (("--data", EXAMPLE, "--benign", bad_benign), ("benign.json",)),
            (("--data", EXAMPLE, "--delta", tmp_path / "none.safetensors"), ("does not exist",))]:
        result = run("evaluate", tiny_folder, *args)
        one_line_error(result, *fragments)
        assert "loading" not in result.stderr  # refused before the model is loaded
    result = run("evaluate", tiny_folder, "--data", EXAMPLE, "--edit", "--delta", tmp_path / "d.safetensors")
    assert result.exit_code == 2 and "not both" in result.output
    assert not out.exists()


def test_in_place_apply_inspect_chain_and_revert(tiny_folder, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_folder, folder)
    original = (folder / "model.safetensors").read_bytes()
    delta_path = tmp_path / "d.safetensors"
    from transformers import AutoModelForCausalLM

    make_delta(AutoModelForCausalLM.from_pretrained(folder)).save(delta_path)  # `dinm edit`: the test above
    result = run("apply", delta_path, folder, "--in-place")
    assert result.exit_code == 0, result.output
    shown = run("inspect", folder, "--json")
    assert shown.exit_code == 0 and len(json.loads(shown.output)["chain"]) == 1
    assert "1 delta(s) applied" in run("inspect", folder).output
    assert run("revert", delta_path, folder, "--in-place").exit_code == 0
    from safetensors.torch import load

    assert load(original).keys() == load((folder / "model.safetensors").read_bytes()).keys()
    assert all(torch.equal(load(original)[k], load((folder / "model.safetensors").read_bytes())[k])
               for k in load(original))
    # a corrupt delta is one line and the folder stays as it is
    bad = tmp_path / "bad.safetensors"
    data = bytearray(delta_path.read_bytes())
    data[-3] ^= 0xFF
    bad.write_bytes(bytes(data))
    before = (folder / "model.safetensors").read_bytes()
    one_line_error(run("apply", bad, folder, "--in-place"), "bad.safetensors")
    assert (folder / "model.safetensors").read_bytes() == before
    result = run("apply", delta_path, folder)
    assert result.exit_code == 2 and "--in-place" in result.output
    (folder / "model.safetensors").rename(folder / "x")
    (folder / "pytorch_model.bin").write_bytes(b"")
    one_line_error(run("apply", delta_path, folder, "--in-place"), "pickle")
