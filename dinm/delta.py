"""`Delta`: an edit as a small `.safetensors` file that applies to, and reverts from, a model exactly.

File layout (no pickle anywhere):

* ``{param}``: the update D, in the parameter's dtype, under the parameter's full name
  (``model.layers.7.mlp.down_proj.weight``). Applying sets ``W_edited = W + D``.
* ``{param}:rows`` (masked form, chosen when smaller): a bool mask of the rows that change; ``{param}`` then
  holds only those rows, in order. Rows outside the mask keep every bit.
* ``{param}:columns`` (column-masked form, chosen when smaller still; one unit's column of the output matrix):
  a bool mask of the columns that change; ``{param}`` holds only those columns, in order (shape (rows, k)).
* ``{param}:up`` / ``{param}:down`` (factored form, a low-rank edit, `EditConfig(rank=r)`): fp32 factors, in the
  parameter's own layout, with ``D = up @ down`` (up: (rows, r), down: (r, columns)); there is no ``{param}``
  tensor. D is composed by `dinm.lowrank.compose` (the same bits on every machine) and cast to the parameter's
  dtype before it is added.
* ``{param}:revert_index`` / ``{param}:revert_value``: the few elements where floating-point rounding makes
  ``(W + D) - D`` differ from ``W``, with their original values, so that revert restores every bit.
* metadata (str -> str): ``format``, ``dinm_version``, ``base_model``, ``base_revision``, ``model_type``,
  ``layer``, ``distance``, ``distances`` (JSON), ``config`` (the `EditConfig` JSON), ``history`` (loss per step,
  JSON), ``seconds`` (where the edit's time went, JSON), ``compute`` (the dtype its passes ran in, and why) and
  ``tensors``: per parameter its shape, dtype, the sha256 of its stored tensors and of the base and the
  edited tensor; and ``checksum``, the sha256 of every other metadata field, so that the whole file (the tensors
  through their sha256 in ``tensors``) is covered.

Format ``dinm.delta.v4`` added the column-masked form, ``dinm.delta.v3`` the factored form; v3, ``dinm.delta.v2``
(added ``checksum``) and ``dinm.delta.v1`` (no header checksum) files are still read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import atomic, ops, placement
from .lowrank import compose
from .config import TWO_UNITS, VARIANTS
from .errors import DeltaError, first_line
from .history import Step
from .version import __version__

FORMAT = "dinm.delta.v4"
# The forms each readable format may hold (v3: no column mask; v2: nor factors; v1: nor the header checksum).
FORMS = ("dense", "rows", "factored", "columns")
_READABLE = {FORMAT: FORMS, "dinm.delta.v3": FORMS[:3], "dinm.delta.v2": FORMS[:2], "dinm.delta.v1": FORMS[:2]}
_CHECKSUMMED = (FORMAT, "dinm.delta.v3", "dinm.delta.v2")
_INT32_INDEX = (FORMAT, "dinm.delta.v3")  # (formats whose revert index may be int32)
_INDEX, _VALUE, _ROWS, _COLS, _UP, _DOWN = ":revert_index", ":revert_value", ":rows", ":columns", ":up", ":down"
UNIT_VARIANTS = tuple(v for v in VARIANTS if v != TWO_UNITS)  # (what one unit of a patch can have trained on)
_JSON_FIELDS = ("config", "distances", "history", "seconds", "tensors", "layers", "units")
_CHECKSUM = "checksum"
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (row-major, its own dtype)."""
    t = tensor.detach().contiguous().cpu()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor, for bit-exact comparison (-0.0 != 0.0, NaN == same NaN)."""
    return t.reshape(-1).view(_INT_VIEW[t.element_size()])


def _digest(tensors: dict[str, torch.Tensor], name: str) -> str:
    """sha256 over the stored bytes of everything a delta keeps for parameter `name` (update, mask, fixups)."""
    h = hashlib.sha256()
    for key in (name, name + _ROWS, name + _COLS, name + _UP, name + _DOWN, name + _INDEX, name + _VALUE):
        if key in tensors:
            h.update(key.encode() + str(tensors[key].dtype).encode() + str(list(tensors[key].shape)).encode())
            h.update(tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def mismatch(desc: dict, found: str, want: str, made_for: str = "") -> str | None:
    """Why a tensor with fingerprint `found` is not the `want` ("base" or "edited") that a delta's tensor
    description `desc` expects, or None when it is."""
    if found == desc[f"{want}_sha256"]:
        return None
    if want == "base" and found == desc["edited_sha256"]:
        return "the delta is already applied"
    if want == "edited" and found == desc["base_sha256"]:
        return "the delta is not applied"
    return f"the weights differ from the {want} this delta was made for{made_for}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def header_checksum(metadata: dict[str, str]) -> str:
    """sha256 of every metadata field but the checksum itself (keys sorted)."""
    fields = {k: v for k, v in metadata.items() if k != _CHECKSUM}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def _json_field(metadata: dict[str, str], key: str, kind: type, where: str):
    """Metadata field `key` parsed as JSON of type `kind`; a one-line `DeltaError` naming it otherwise."""
    try:
        value = json.loads(metadata[key])
    except (ValueError, RecursionError, TypeError):
        value = None
    if not isinstance(value, kind):
        raise DeltaError(f"delta {where}: metadata field {key!r} is not a JSON {kind.__name__}; use an intact copy")
    return value


def _index(value) -> bool:
    """A layer, unit or step number as a delta's metadata may hold it: an int in [0, 10^6) (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1_000_000


def _number(value) -> bool:
    """A figure a delta's metadata may hold: an int or a float a float can hold (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e308


def _form(desc: dict, tensors: dict[str, torch.Tensor], name: str) -> str:
    """The form a parameter's update is stored in (a delta written before the "form" field: rows when it holds
    a row mask, else dense)."""
    return desc.get("form", "rows" if name + _ROWS in tensors else "dense")


def _add(tensor: torch.Tensor, d: torch.Tensor, mask: torch.Tensor | None, form: str, alpha: float) -> None:
    """`tensor += alpha * d` in place, where `d` holds only the rows (form "rows") or columns ("columns") of
    `mask`, or the whole update (any other form)."""
    if form == "columns":  # (the columns of a matrix are the rows of its transpose, a view of the same storage)
        ops.masked_update(tensor.t(), d.t(), mask, alpha)
    else:
        ops.masked_update(tensor, d, mask, alpha)


def _described(tensors: dict[str, torch.Tensor], name: str, base: torch.Tensor, d: torch.Tensor,
               mask: torch.Tensor | None, form: str) -> dict:
    """The metadata of parameter `name` whose update `d` (in `base`'s dtype; only the rows or columns of `mask`
    in those forms) is already in `tensors`; adds to `tensors` the few elements a revert must restore by value
    (bit-exactness)."""
    applied = base.clone()
    _add(applied, d, mask, form, 1.0)
    undone = applied.clone()
    _add(undone, d, mask, form, -1.0)
    off = (_bits(undone) != _bits(base)).nonzero().reshape(-1)
    if off.numel():
        # (int32 where it can hold every position: a third fewer bytes than int64; v3 files only)
        tensors[name + _INDEX] = off.to(torch.int32 if base.numel() < 2 ** 31 else torch.int64).cpu()
        tensors[name + _VALUE] = base.reshape(-1)[off].cpu()
    return {"shape": list(base.shape), "dtype": _dtype_name(base.dtype), "form": form,
            "delta_sha256": _digest(tensors, name), "base_sha256": fingerprint(base),
            "edited_sha256": fingerprint(applied)}


# What an edit did before these EditConfig fields existed (their defaults since differ).
_BEFORE_FIELD = {"kl_text": "answer", "preserve_weight": 0.0, "matrix": "down", "variants": "none",
                 "unit_reply_on": 0}


class Delta:
    """The update of one or more parameters, with what is needed to check and undo it.

    Build one with `dinm.edit` (or `Delta.from_weights`), store it with `save`, read it with `Delta.load`.
    `apply` and `revert` mutate the model in place; apply then revert restores every bit.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
        self.tensors = tensors
        self.metadata = dict(metadata)
        if self.metadata.get("format") in _CHECKSUMMED:  # built in memory: its header is what the caller gave
            self.metadata[_CHECKSUM] = header_checksum(self.metadata)
        self._validate("<in memory>")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_weights(cls, edits: dict[str, tuple[torch.Tensor, torch.Tensor]], info: dict[str, Any], *,
                     tolerance: float = 0.0) -> "Delta":
        """A delta from ``{name: (base, edited)}``. ``info`` holds the metadata fields other than
        ``format``, ``tensors`` and ``dinm_version`` (values that are not strings are stored as JSON).

        A 2-D update is stored in the smallest of three forms: whole, its changed rows (any element changed by
        more than `tolerance`) under a row mask, or its changed columns under a column mask (one unit's column
        of the output matrix: a few KB instead of the matrix). With `tolerance` > 0 the smaller changes are
        dropped, and the delta's edited fingerprint is that of what applying it really gives."""

        tensors, described = {}, {}
        for name, (base, edited) in edits.items():
            base = base.detach().contiguous()
            d = (edited.detach().to(device=base.device, dtype=base.dtype) - base).contiguous()
            mask, form = None, "dense"
            if d.dim() == 2:
                size = d.numel() * d.element_size()
                for dim, kind in ((1, "rows"), (0, "columns")):
                    changed = (d.abs() > tolerance).any(dim=dim)
                    masked = int(changed.sum()) * d.shape[dim] * d.element_size() + changed.numel()
                    if masked < size:
                        size, mask, form = masked, changed, kind
                if form == "rows":
                    d = d[mask].contiguous()
                elif form == "columns":
                    d = d[:, mask].contiguous()
            tensors[name] = d.cpu()
            if mask is not None:
                tensors[name + (_ROWS if form == "rows" else _COLS)] = mask.cpu()
            described[name] = _described(tensors, name, base, d, mask, form)
        return cls._built(tensors, described, info)

    @classmethod
    def from_factors(cls, edits: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], info: dict[str, Any]
                     ) -> "Delta":
        """A delta in factored form from ``{name: (base, up, down)}``: the update of each 2-D parameter is
        ``up @ down`` in the parameter's own layout (up: (rows, r), down: (r, columns)), kept as fp32 factors.
        ``info`` as for `from_weights`."""
        tensors, described = {}, {}
        for name, (base, up, down) in edits.items():
            base = base.detach().contiguous()
            up, down = up.detach().float().contiguous().cpu(), down.detach().float().contiguous().cpu()
            if base.dim() != 2 or up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0] or (
                    up.shape[0], down.shape[1]) != tuple(base.shape):
                raise DeltaError(f"factors of {name!r} do not fit: {list(up.shape)} @ {list(down.shape)} for a "
                                 f"parameter of shape {list(base.shape)}")
            tensors[name + _UP], tensors[name + _DOWN] = up, down
            d = compose(up, down).to(device=base.device, dtype=base.dtype)
            described[name] = {**_described(tensors, name, base, d, None, "factored"), "rank": up.shape[1]}
        return cls._built(tensors, described, info)

    @classmethod
    def _built(cls, tensors: dict[str, torch.Tensor], described: dict[str, dict], info: dict[str, Any]) -> "Delta":
        metadata = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in info.items()}
        metadata.update(format=FORMAT, dinm_version=__version__, tensors=json.dumps(described, sort_keys=True))
        return cls(tensors, metadata)  # adds the header checksum

    # ---------------------------------------------------------------- reading the metadata
    @property
    def names(self) -> list[str]:
        """Full names of the parameters this delta changes."""
        return sorted(self.described)

    @property
    def described(self) -> dict[str, dict]:
        return json.loads(self.metadata["tensors"])

    @property
    def layer(self) -> int | None:
        return int(self.metadata["layer"]) if "layer" in self.metadata else None

    @property
    def layers(self) -> list[int]:
        """The layers the edit changed: several for a patch of units (`EditConfig.unit_per_instance` on a list,
        `variants="request+wrapped"`) whose units lie in several layers, else its one layer (empty when not
        recorded)."""
        if "layers" in self.metadata:
            return json.loads(self.metadata["layers"])
        return [] if self.layer is None else [self.layer]

    @property
    def units(self) -> list[dict]:
        """A patch of units' units (instance_ids: the ids of the instances it trained on, and instance_id: that id
        where it is one, else "N instances"; the variants it trained, layer, unit, steps_run, nll_first, nll_last,
        distances), in the order they were trained; empty for any other delta."""
        return json.loads(self.metadata.get("units", "[]"))

    @property
    def distances(self) -> list[float]:
        return json.loads(self.metadata.get("distances", "[]"))

    @property
    def instance_ids(self) -> list[str]:
        """The ids of the instances the edit was made from (several for a batch edit; empty when not recorded)."""
        if "instance_ids" in self.metadata:
            return json.loads(self.metadata["instance_ids"])
        return [self.metadata["instance_id"]] if "instance_id" in self.metadata else []

    @property
    def history(self) -> list[Step]:
        """What each step of the edit recorded (empty for a delta not made by `dinm.edit`)."""
        return [Step.from_dict(h) for h in json.loads(self.metadata.get("history", "[]"))]

    @property
    def config(self):
        from .config import EditConfig

        if "config" not in self.metadata:
            return None
        # A field the delta's dinm did not have yet: what that dinm did, not today's default.
        return EditConfig.from_json(self.metadata["config"], absent=_BEFORE_FIELD)

    def form(self, name: str) -> str:
        """How the update of parameter `name` is stored: "dense", "rows" (row-masked), "columns" (column-masked)
        or "factored"."""
        return _form(self.described[name], self.tensors, name)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(up, down)`` (fp32, the parameter's layout) of a factored update, or None for a dense one."""
        if name + _UP not in self.tensors:
            return None
        return self.tensors[name + _UP], self.tensors[name + _DOWN]

    def stored_update(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(d, mask)``: the update of parameter `name` in its dtype as `apply` adds it, and the mask it is
        limited to: None (every element), the row mask (form "rows": `d` holds those rows) or the column mask
        (form "columns": `d` holds those columns). A factored update is composed here (`dinm.lowrank.compose`)."""
        factors = self.factors(name)
        if factors is not None:
            return compose(*factors).to(getattr(torch, self.described[name]["dtype"])), None
        return self.tensors[name], self.tensors.get(name + _ROWS, self.tensors.get(name + _COLS))

    def dense(self, name: str) -> torch.Tensor:
        """The update of parameter `name` as a full tensor of the parameter's shape (zeros where unchanged)."""
        d, mask = self.stored_update(name)
        if mask is None:
            return d
        full = torch.zeros(self.described[name]["shape"], dtype=d.dtype)
        if self.form(name) == "columns":
            full[:, mask] = d
        else:
            full[mask] = d
        return full

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def summary(self) -> dict[str, Any]:
        """What `dinm inspect` shows."""
        out = {k: json.loads(v) if k in _JSON_FIELDS else v for k, v in self.metadata.items()}
        out["tensors"] = {}
        for name, desc in self.described.items():
            d, mask = self.stored_update(name)
            d, form = d.float(), self.form(name)
            out["tensors"][name] = {**desc, "form": form,
                                    "stored_bytes": sum(t.numel() * t.element_size() for k, t in self.tensors.items()
                                                        if k == name or k.startswith(name + ":")
                                                        and k[len(name):] not in (_INDEX, _VALUE)),
                                    "rows_changed": int(mask.sum()) if form == "rows" else desc["shape"][0],
                                    **({"columns_changed": int(mask.sum())} if form == "columns" else {}),
                                    "update_norm": float(d.norm()),
                                    "max_abs": float(d.abs().max()) if d.numel() else 0.0,
                                    "exactness_fixups": int(self.tensors.get(name + _INDEX, torch.empty(0)).numel())}
        out["tensor_bytes"] = self.nbytes
        return out

    # ---------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> None:
        """Write to `path` whole or not at all (`dinm.atomic.replacing`): a file it replaces keeps its mode, a new
        one gets the umask's default."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise DeltaError(f"cannot write delta `{path}`: folder `{folder}` does not exist")
        try:
            with atomic.replacing(path) as tmp:
                save_file({k: v.contiguous() for k, v in self.tensors.items()}, tmp, metadata=self.metadata)
        except (OSError, SafetensorError) as e:
            raise DeltaError(f"cannot write delta `{path}` ({first_line(e)}); nothing was written") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Delta":
        """Read and validate a delta file."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DeltaError(f"delta file `{path}` does not exist")
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise DeltaError(f"delta file `{path}` is not a readable safetensors file ({first_line(e)})") from None
        delta = cls.__new__(cls)
        delta.tensors, delta.metadata = tensors, metadata
        delta._validate(f"`{path}`")
        return delta

    def _validate(self, where: str) -> None:
        fmt = self.metadata.get("format")
        if not isinstance(fmt, str) or fmt not in _READABLE:
            raise DeltaError(f"delta {where} is not a dinm delta (metadata 'format' is "
                             f"{fmt!r}, expected {FORMAT!r})")
        if fmt in _CHECKSUMMED and self.metadata.get(_CHECKSUM) != header_checksum(self.metadata):
            raise DeltaError(f"delta {where} is corrupt: its metadata does not match its checksum; use an intact copy")
        if "tensors" not in self.metadata:
            raise DeltaError(f"delta {where} has no valid 'tensors' metadata")
        described = _json_field(self.metadata, "tensors", dict, where)
        if not described:
            raise DeltaError(f"delta {where} has no valid 'tensors' metadata")
        parsed = {key: _json_field(self.metadata, key, kind, where)
                  for key, kind in (("distances", list), ("history", list), ("config", dict), ("seconds", dict),
                                    ("layers", list), ("units", list))
                  if key in self.metadata}
        if not all(isinstance(h, dict) and isinstance(h.get("step"), int) and _number(h.get("nll"))
                   and all(h.get(k) is None or _number(h[k]) for k in ("kl", "moved", "unsafe", "off", "loss"))
                   and isinstance(h.get("stopped", False), bool) for h in parsed.get("history", [])):
            raise DeltaError(f"delta {where}: metadata field 'history' must be a list of steps (objects with 'step' "
                             f"and 'nll'); use an intact copy")
        if "layer" in self.metadata and not re.fullmatch(r"\d{1,6}", self.metadata["layer"]):
            raise DeltaError(f"delta {where}: metadata field 'layer' must be a layer number, got "
                             f"{self.metadata['layer'][:20]!r}")
        units = parsed.get("units", [])
        if not all(_index(n) for n in parsed.get("layers", [])) or ("units" in parsed) != ("layers" in parsed) or (
                "layers" in parsed and "layer" in self.metadata and parsed["layers"] != [int(self.metadata["layer"])]):
            raise DeltaError(f"delta {where}: metadata field 'layers' must be a list of layer numbers (with 'units', "
                             f"and only with them; its one layer where 'layer' is given too); use an intact copy")
        if not all(isinstance(u, dict) and isinstance(u.get("instance_id"), str)
                   and all(_index(u.get(k)) for k in ("layer", "unit", "steps_run"))
                   and u.get("variants", "none") in UNIT_VARIANTS
                   and isinstance(u.get("instance_ids", []), list) and all(isinstance(i, str) for i in
                                                                          u.get("instance_ids", []))
                   and all(_number(u.get(k)) for k in ("nll_first", "nll_last"))
                   and isinstance(u.get("distances", []), list) and all(_number(x) for x in u.get("distances", []))
                   for u in units) or sorted({u["layer"] for u in units}) != parsed.get("layers", []) or len(
                {(u["layer"], u["unit"]) for u in units}) != len(units) or (units and "unit" in self.metadata):
            raise DeltaError(f"delta {where}: metadata field 'units' must be a list of units (objects with "
                             f"instance_id, layer, unit, steps_run, nll_first, nll_last, and where given variants none, "
                             f"request or wrapped and instance_ids a list of ids) on the layers of 'layers', no "
                             f"unit twice, and no 'unit' beside it; use an intact copy")
        expected = set()
        for name, desc in described.items():
            if not (isinstance(desc, dict) and isinstance(desc.get("shape"), list)
                    and all(isinstance(n, int) and n >= 0 for n in desc["shape"]) and isinstance(desc.get("dtype"), str)
                    and all(isinstance(desc.get(k), str) and re.fullmatch(r"[0-9a-f]{64}", desc[k])
                            for k in ("base_sha256", "edited_sha256", "delta_sha256"))):
                raise DeltaError(f"delta {where}: the metadata of tensor {name!r} is malformed (needs shape, dtype, "
                                 f"base_sha256, edited_sha256, delta_sha256)")
            form = _form(desc, self.tensors, name)
            if form not in _READABLE[fmt]:
                raise DeltaError(f"delta {where}: the metadata of tensor {name!r} is malformed: its form "
                                 f"{str(desc.get('form'))[:20]!r} is not one a {fmt} file holds "
                                 f"({', '.join(_READABLE[fmt])})")
            shape = desc["shape"]
            if form == "factored":
                expected |= {name + _UP, name + _DOWN}
                t = self._check_factors(name, desc, where)
            else:
                expected.add(name)
                if name not in self.tensors:
                    raise DeltaError(f"delta {where} describes tensor {name!r} but does not hold it")
                t = self.tensors[name]
                for dim, suffix, kind in ((0, _ROWS, "rows"), (1, _COLS, "columns")):
                    if name + suffix not in self.tensors and form != kind:
                        continue
                    expected.add(name + suffix)
                    mask = self.tensors.get(name + suffix)
                    if (form != kind or mask is None or len(shape) != 2 or mask.dtype != torch.bool
                            or list(mask.shape) != shape[dim:dim + 1]
                            or (mask.numel() and mask.view(torch.uint8).max() > 1)):
                        raise DeltaError(f"delta {where}: the {kind[:-1]} mask of {name!r} is malformed or does "
                                         f"not match its form {form!r} (expected "
                                         f"bool[{shape[dim] if len(shape) == 2 else '?'}]); use an intact copy")
                    shape = [int(mask.sum()), shape[1]] if dim == 0 else [shape[0], int(mask.sum())]
                if list(t.shape) != shape or _dtype_name(t.dtype) != desc.get("dtype"):
                    raise DeltaError(f"delta {where}: tensor {name!r} is {_dtype_name(t.dtype)}{list(t.shape)}, "
                                     f"its metadata says {desc.get('dtype')}{shape}")
                if not torch.isfinite(t).all():
                    raise DeltaError(f"delta {where}: tensor {name!r} holds NaN or inf; refusing it")
            if name + _INDEX in self.tensors:
                expected |= {name + _INDEX, name + _VALUE}
                idx, val = self.tensors[name + _INDEX], self.tensors.get(name + _VALUE)
                index_dtypes = (torch.int64, torch.int32) if fmt in _INT32_INDEX else (torch.int64,)
                if (val is None or idx.dtype not in index_dtypes or idx.dim() != 1 or val.shape != idx.shape
                        or val.dtype != t.dtype or (idx.numel() and (idx.min() < 0 or idx.max() >= math.prod(
                            desc["shape"]) or not bool((idx[1:] > idx[:-1]).all())))):  # (sorted, no repeat)
                    raise DeltaError(f"delta {where}: the revert index of {name!r} is malformed")
                if not torch.isfinite(val).all():
                    raise DeltaError(f"delta {where}: the revert values of {name!r} hold NaN or inf; refusing it")
            if _digest(self.tensors, name) != desc["delta_sha256"]:
                raise DeltaError(f"delta {where} is corrupt: the stored update of {name!r} does not match its "
                                 f"checksum; use an intact copy")
        extra = set(self.tensors) - expected
        if extra:
            raise DeltaError(f"delta {where} holds tensors its metadata does not describe: {sorted(extra)}")

    def _check_factors(self, name: str, desc: dict, where: str) -> torch.Tensor:
        """Check the factors of a factored update; returns an empty tensor of the parameter's dtype (what the
        revert values must match)."""
        shape, rank = desc["shape"], desc.get("rank")
        dtype = getattr(torch, desc["dtype"], None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or len(shape) != 2 or not (
                isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
            raise DeltaError(f"delta {where}: the metadata of tensor {name!r} is malformed (a factored update needs "
                             f"a 2-D shape, a floating dtype and a rank >= 1)")
        up, down = self.tensors.get(name + _UP), self.tensors.get(name + _DOWN)
        if up is None or down is None:
            raise DeltaError(f"delta {where} describes a factored update of {name!r} but does not hold both "
                             f"factors ({name}{_UP}, {name}{_DOWN})")
        if (up.dtype != torch.float32 or down.dtype != torch.float32 or list(up.shape) != [shape[0], rank]
                or list(down.shape) != [rank, shape[1]]):
            raise DeltaError(f"delta {where}: the factors of {name!r} are {_dtype_name(up.dtype)}{list(up.shape)} "
                             f"and {_dtype_name(down.dtype)}{list(down.shape)}, its metadata says float32 "
                             f"{[shape[0], rank]} and {[rank, shape[1]]}")
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise DeltaError(f"delta {where}: the factors of {name!r} hold NaN or inf; refusing them")
        return torch.empty(0, dtype=dtype)

    # ---------------------------------------------------------------- model surgery
    def _targets(self, model, want: str, force: bool) -> list[tuple[str, torch.Tensor]]:
        """Check every parameter before anything is changed; `want` is "base" or "edited". Returns the tensors
        to change in place (for a parameter accelerate offloaded, the one its hook loads from)."""
        targets = []
        model_id = self.metadata.get("base_model", "?")
        for name, desc in self.described.items():
            try:
                model.get_parameter(name)
            except AttributeError:
                raise DeltaError(f"the model has no parameter {name!r}; this delta is for a "
                                 f"{self.metadata.get('model_type', '?')} model ({model_id})") from None
            param = placement.writable(model, name, "apply" if want == "base" else "revert")
            if list(param.shape) != desc["shape"] or _dtype_name(param.dtype) != desc["dtype"]:
                raise DeltaError(f"parameter {name!r} is {_dtype_name(param.dtype)}{list(param.shape)} in the model "
                                 f"but {desc['dtype']}{desc['shape']} in the delta; load the model in {desc['dtype']}")
            why = None if force else mismatch(desc, fingerprint(param), want, f" ({model_id})")
            if why:
                raise DeltaError(f"refusing to {'apply' if want == 'base' else 'revert'}: parameter {name!r} "
                                 f"does not match: {why}; pass force=True (--force) to override")
            targets.append((name, param))
        return targets

    @torch.no_grad()
    def update_tensor(self, name: str, tensor: torch.Tensor, revert: bool = False) -> None:
        """Add (or, with `revert`, take back bit-exactly) this delta's update of parameter `name` to `tensor`,
        in place, without any check: `apply`/`revert` and `dinm.checkpoint` check first."""
        d, mask = self.stored_update(name)
        _add(tensor, d.to(tensor.device), None if mask is None else mask.to(tensor.device), self.form(name),
             -1.0 if revert else 1.0)
        if revert and name + _INDEX in self.tensors:
            index, value = self.tensors[name + _INDEX], self.tensors[name + _VALUE]
            tensor.view(-1)[index.to(device=tensor.device, dtype=torch.int64)] = value.to(tensor.device)

    @torch.no_grad()
    def updated(self, name: str, tensor: torch.Tensor, revert: bool = False, check: bool = True) -> torch.Tensor:
        """A new tensor: `tensor` with this delta's update of parameter `name` added (or taken back). With `check`
        the result must be the tensor the delta records (``edited_sha256``, or ``base_sha256`` for a revert):
        a delta that does not give what it promises is refused, whatever the input."""
        result = tensor.detach().clone()
        self.update_tensor(name, result, revert=revert)
        if check:
            want = "base" if revert else "edited"
            if fingerprint(result) != self.described[name][f"{want}_sha256"]:
                raise DeltaError(f"delta for {name!r} is damaged: {'reverting' if revert else 'applying'} it does "
                                 f"not give the {want} tensor it records ({want}_sha256); nothing was changed. "
                                 f"Use an intact copy of the delta")
        return result

    @torch.no_grad()
    def _change(self, model, want: str, force: bool) -> None:
        # Every result is computed and checked before any parameter is written.
        results = [(tensor, self.updated(name, tensor, revert=want == "edited", check=not force))
                   for name, tensor in self._targets(model, want, force)]
        for tensor, result in results:
            tensor.copy_(result)

    def apply(self, model, force: bool = False) -> None:
        """Add the delta to `model`'s weights, in place. Refused (model untouched) when the weights are not the
        base the delta was made for, or when the result is not what the delta records, unless `force`."""
        self._change(model, "base", force)

    def revert(self, model, force: bool = False) -> None:
        """Undo `apply`, in place, restoring every bit. Refused (model untouched) when the model does not hold
        exactly the edited weights, or when the result is not the recorded base, unless `force`."""
        self._change(model, "edited", force)

    @contextlib.contextmanager
    def applied(self, model, force: bool = False) -> Iterator[Any]:
        """Inside the block `model` holds the edit; on leaving it, even by an exception, it is as it was, bit for
        bit (by `revert`, or with `force`, whose base may not be the delta's, from a copy of the changed tensors).

        Example:
            >>> with delta.applied(model):
            ...     replies = dinm.generate.generate(model, tokenizer, prompts)
        """
        undo = self.undoer(model, revert=False, force=force)
        self.apply(model, force=force)
        try:
            yield model
        finally:
            undo()

    def undoer(self, model, revert: bool, force: bool):
        """A function that undoes `apply` (or, with `revert`, `revert`) of this delta on `model`, to call after it:
        the inverse operation, checked; with `force`, a copy of the tensors as they are now, written back."""
        if not force:
            return lambda: self._change(model, "base" if revert else "edited", False)
        saved = [(tensor, tensor.detach().clone()) for _, tensor in self._targets(model, "any", True)]

        def restore():
            with torch.no_grad():
                for tensor, copy in saved:
                    tensor.copy_(copy)
        return restore
