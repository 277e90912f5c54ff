"""Property tests: whatever bytes a delta file holds and whatever JSON an instance is, the reader returns a
valid object or raises its own one-line error — never anything else. CI runs a bounded number of examples;
benchmarks/fuzz.py runs >= 10,000 (DINM_FUZZ_EXAMPLES)."""

import json
import os
import struct
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dinm import Delta
from dinm.errors import DeltaError, InstanceError
from dinm.instance import parse_instance

EXAMPLES = int(os.environ.get("DINM_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 1000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NAME = "model.layers.0.mlp.down_proj.weight"
BASE = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 7


def _valid_bytes() -> bytes:
    edited = BASE.clone()
    edited[1] += 0.25
    delta = Delta.from_weights({NAME: (BASE, edited)}, {"layer": 0})
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "d.safetensors")
        delta.save(path)
        with open(path, "rb") as f:
            return f.read()


VALID = _valid_bytes()
HEADER_LEN = struct.unpack("<Q", VALID[:8])[0]
HEADER = json.loads(VALID[8:8 + HEADER_LEN])


def _with_header(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + VALID[8 + HEADER_LEN:]


_values = st.one_of(st.integers(-2**40, 2**40), st.text(max_size=8), st.lists(st.integers(-5, 10**9), max_size=4),
                    st.none())


@st.composite
def lying_header(draw):
    header = json.loads(json.dumps(HEADER))
    key = draw(st.sampled_from(sorted(header)))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "__delete__", "__metadata__"]))
    if key == "__metadata__" or field == "__metadata__":
        meta = header.setdefault("__metadata__", {})
        meta_key = draw(st.sampled_from(sorted(meta) + ["format", "tensors"]))
        meta[meta_key] = draw(st.one_of(st.text(max_size=40), st.just("{}"), st.just(json.dumps(
            {NAME: {"shape": draw(st.lists(st.integers(0, 6), max_size=3)), "dtype": "float32"}}))))
    elif field == "__delete__":
        del header[key]
    elif field == "dtype":
        header[key]["dtype"] = draw(st.sampled_from(["F16", "BF16", "F64", "I64", "BOOL", "U8", "X9"]))
    else:
        header[key][field] = draw(_values)
    return _with_header(header)


@st.composite
def damaged(draw):
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    return bytes(data)


delta_bytes = st.one_of(
    st.binary(max_size=256),
    st.integers(0, len(VALID) - 1).map(lambda n: VALID[:n]),  # truncated
    damaged(),
    lying_header(),
)


@FUZZ
@given(delta_bytes)
def test_delta_reader_never_fails_otherwise(data):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "d.safetensors")
        with open(path, "wb") as f:
            f.write(data)
        try:
            delta = Delta.load(path)
        except DeltaError as e:
            assert str(e) and "\n" not in str(e)
            return
    # Accepted: then it is consistent, and applying it either works exactly or is refused cleanly.
    for name in delta.names:
        assert torch.isfinite(delta.tensors[name]).all()
    target = holder = torch.nn.Module()
    for part in NAME.split(".")[:-1]:
        holder.add_module(part, torch.nn.Module())
        holder = getattr(holder, part)
    holder.register_parameter("weight", torch.nn.Parameter(BASE.clone()))
    try:
        delta.apply(target)
        delta.revert(target)
        assert torch.equal(target.get_parameter(NAME), BASE)
    except DeltaError:
        pass


_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children,
                                                                               max_size=5)),
    max_leaves=20)
_keys = st.sampled_from(["prompt", "safe", "unsafe", "benign", "id", "generalization", "adversarial prompt",
                         "safe generation", "unsafe generation", "knowledge constrain", "generalization test",
                         "question", "answer"])
_records = st.dictionaries(_keys, st.one_of(_json, st.text(max_size=30),
                                            st.dictionaries(_keys, st.one_of(st.text(max_size=30), _json),
                                                            max_size=4)), max_size=8)


@FUZZ
@given(st.one_of(_json, _records))
def test_instance_parser_never_fails_otherwise(obj):
    try:
        inst = parse_instance(obj, "fuzz.json", 0)
    except InstanceError as e:
        assert "fuzz.json" in str(e) and "\n" not in str(e)
        return
    for text in (inst.prompt, inst.safe, inst.unsafe, inst.benign_prompt, inst.benign_answer):
        assert isinstance(text, str) and text.strip()
    assert parse_instance(inst.to_dict()) == inst  # the short form round-trips
