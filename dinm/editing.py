"""Step 2 of DINM: train what `EditConfig.matrix` names of the located layer's MLP for a few steps: by default, on a
gated MLP, two units repurposed as thresholded detectors, one after another (`dinm.unit`, `_unit_patch`); else the
output projection (DINM's), or one of its input projections.

Loss = NLL of the safe response to the adversarial prompt + the weighted penalties of the regularisers
(`dinm.terms`: the KL on the benign prompt's answer, the benign-key penalty). The passes that compute it never
write to the model (`dinm.passes`); the result is a `Delta`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Sequence as SequenceOf

import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from . import placement, terms, unit
from .arch import as_out_in, matrix_module, matrix_name, num_layers
from .config import TWO_UNITS, EditConfig
from .delta import Delta
from .errors import ConfigError, EditError
from .history import Step
from .instance import Instance, request_of, wrapped
from .keys import key_moment, mlp_inputs
from .locating import locate
from .passes import Passes, frozen
from .text import encode_pair
from .trace import input_of

logger = logging.getLogger(__name__)


def edit(model, tokenizer, instance: Instance | SequenceOf[Instance], config: EditConfig | None = None, *,
         progress: bool | None = None) -> Delta:
    """Edit `model` so that it answers `instance.prompt` with `instance.safe`; return the edit as a `Delta`.

    With a list of instances (batch editing: a list of failures, one patch), one `Delta` answers them all: one
    layer located for all of them (the largest mean distance), trained on their mean NLL plus the KL on all their
    benign prompts and the benign-key penalty (a unit edit: one unit, kept off on all their benign prompts). With
    `config.unit_per_instance`, one unit per instance instead, each trained as that instance's single edit of the
    model with the units before it added (a patch of units, `_unit_patch`); with `config.variants="request+wrapped"`,
    two such units for each (the request's, then the wrappers').

    The model is left bit-identical (weights, `requires_grad` flags, train/eval mode); call
    `delta.apply(model)`, or `with delta.applied(model): ...`, to edit it.

    Args:
        model: a causal LM whose `model_type` is in `dinm.arch.ARCHITECTURES`.
        tokenizer: its tokenizer (its chat template is used when `config.chat_template`).
        instance: the edit request (`dinm.load_instance`), or a list of them (`dinm.load_instances`).
        config: an `EditConfig`; `EditConfig()` by default: for one instance, two units as thresholded detectors
            where the MLP is gated (`EditConfig.two_units()`'s setting); else, and for a list, a dense edit of the
            output projection (`EditConfig.dense()`).
        progress: show a progress bar (None: only on a terminal).

    Returns:
        The `Delta` of what was edited (a unit's gate row, up row and down column, or those of a patch's units; or the
        located layer's MLP output weight, or with `config.matrix` an input one), with the config it ran
        (`EditConfig.resolved`), the per-layer distances and the record of every step (`dinm.Step`) in its metadata
        (a patch of units: each unit's layer, index, distances and NLL under "units", the steps' means over the
        units as its history).

    Raises:
        EditError: the loss or the weights became NaN/inf (the model is untouched); lower `lr`.

    Example:
        >>> delta = dinm.edit(model, tokenizer, dinm.load_instance("data/example.json"))
        >>> with delta.applied(model): ...
    """
    batch = _batch(instance)
    config = (config or EditConfig()).resolved(unit.supported(model), len(batch))
    if config.variants == TWO_UNITS or config.unit_per_instance and len(batch) > 1:
        groups = [[inst] for inst in batch] if config.unit_per_instance else [batch]
        sets = ("request", "wrapped") if config.variants == TWO_UNITS else (config.variants,)
        jobs = [(group, config.replace(variants=v)) for group in groups for v in sets]
        return _unit_patch(model, tokenizer, jobs, batch, config, progress)
    run = _train(model, tokenizer, batch, config, progress)
    return _package(model, batch, config, run)


@dataclasses.dataclass
class _Run:
    """What one training run of `edit` left: the edited parameter's name (for a unit, its down matrix), the layer
    and the per-layer distances it was located by, the trained object, the steps and the seconds of each phase."""

    name: str
    layer: int
    distances: list[float]
    trained: object
    history: list[Step]
    seconds: dict[str, float]
    compute: str


def _train(model, tokenizer, batch: list[Instance], config: EditConfig, progress: bool | None,
           taken: dict[int, set[int]] | None = None, negatives_of: list[Instance] | None = None) -> _Run:
    """Locate and train the edit of `batch` that `config` (resolved) asks for. For a unit: `taken`, the units
    (layer -> indices) it may not repurpose; `negatives_of`, the instances whose benign prompts it must stay off on
    (`batch` by default)."""
    trained_on = batch + _variants(batch, config)  # (located from the instances themselves)
    if config.prompt_suffix.strip():
        batch, trained_on = ([dataclasses.replace(inst, prompt=f"{inst.prompt} {config.prompt_suffix.strip()}")
                              for inst in insts] for insts in (batch, trained_on))
    started = time.perf_counter()
    with record_function("dinm::locate"):
        layer, distances = _layer(model, tokenizer, batch, config)
    locate_s = time.perf_counter() - started
    matrix = "down" if config.matrix == "unit" else config.matrix  # (a unit edit also changes that one)
    name = matrix_name(model, layer, matrix)
    weight = placement.stored(model, name)  # an offloaded layer's from accelerate's map
    device = placement.module_device(matrix_module(model, layer, matrix))
    history: list[Step] = []
    # ("keys": the benign-key statistic; for a unit, its negatives' inputs and its gate probe's fit)
    seconds = {"locate": locate_s, "reply": 0.0, "keys": 0.0, "forward": 0.0, "backward": 0.0}
    with frozen(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        encoded = [encode_pair(tokenizer, inst.prompt, inst.safe, **config.encoding()) for inst in trained_on]
        repurposed = trained = None
        if config.matrix == "unit":
            tick = time.perf_counter()
            with record_function("dinm::unit"):
                repurposed, trained, unit_terms = unit.prepare(model, tokenizer, layer, negatives_of or batch,
                                                               encoded, config.chat_template,
                                                               config.preserve_weight, config.seed,
                                                               (taken or {}).get(layer, ()), config.unit_reply_off,
                                                               config.unit_reply_on)
            seconds["keys"] = time.perf_counter() - tick
        passes = Passes(model, layer, config.compute_dtype, config.matrix, unit=repurposed)
        targets = [passes.sequence(e) for e in encoded]
        edited = torch.zeros_like(trained.change) if trained else as_out_in(passes.spec, weight.detach())
        regularisers = terms.build(model, tokenizer, batch, layer, passes, edited, config, seconds)
        if trained:
            regularisers += unit_terms
        elif config.rank:
            zero = torch.zeros(as_out_in(passes.spec, weight).shape, device=passes.device, requires_grad=True)
            gradient = sum(torch.autograd.grad(passes.loss(target, zero) / len(targets), [zero])[0]
                           for target in targets)  # (the KL's and the key penalty's is 0 there)
            moment = _moment(model, tokenizer, layer, regularisers, config, passes) if config.preserve_weight else None
            trained = _Factored(passes.spec, weight, config.rank, gradient, moment)
        elif config.precondition == "keys":
            trained = _Whitened(passes.spec, weight, _preconditioner(model, tokenizer, layer, regularisers, config,
                                                                     passes))
        else:
            trained = _Dense(passes.spec, weight, torch.float32 if config.master_dtype == "float32" else weight.dtype,
                             passes.device)
        optimizer = torch.optim.Adam(trained.params, lr=config.lr, weight_decay=config.weight_decay,
                                     fused=passes.device.type in ("cpu", "cuda"))  # one kernel, no temporaries
        for step in tqdm(range(config.steps), desc=f"dinm edit (layer {layer})",
                         disable=None if progress is None else not progress, leave=False):
            # One backward per target and per penalty piece (a batch's graphs are never all held at once).
            grads: list[torch.Tensor] | None = None
            nll = torch.zeros((), device=passes.device)
            for target in targets:
                tick = time.perf_counter()
                with record_function("dinm::nll_pass"):
                    piece = passes.loss(target, trained.update()) / len(targets)
                tock = time.perf_counter()
                with record_function("dinm::backward"):
                    grads = _accumulate(grads, torch.autograd.grad(piece, trained.params))
                nll = nll + piece.detach()
                seconds["forward"] += tock - tick
                seconds["backward"] += time.perf_counter() - tock
            nll = nll.item()  # (one host sync a step)
            if config.stop_nll is not None and nll < config.stop_nll:
                history.append(Step(step, nll, stopped=True))
                break  # the safe responses are likely enough: no further change
            tick = time.perf_counter()
            update = trained.update()
            penalties, toward, backward_s = _penalties(regularisers, update.detach())
            rest = sum(term.weight * penalties[term.name] for term in regularisers)
            loss = nll + rest
            history.append(Step(step, nll, loss=loss, **penalties))
            if not math.isfinite(loss):
                raise EditError(f"edit diverged at step {step}: loss is {loss}; the model is unchanged. "
                                f"Lower lr (now {config.lr})")
            tock = time.perf_counter()
            if toward is not None:  # (not at the first step: the KL is 0 there and so is its gradient)
                with record_function("dinm::backward"):
                    grads = _accumulate(grads, torch.autograd.grad(update, trained.params, toward,
                                                                   allow_unused=True))
            for param, grad in zip(trained.params, grads):
                param.grad = grad
            with record_function("dinm::adam"):
                optimizer.step()
            seconds["forward"] += tock - tick - backward_s
            seconds["backward"] += time.perf_counter() - tock + backward_s
    seconds["edit"] = time.perf_counter() - started - locate_s
    return _Run(name, layer, distances, trained, history, seconds, passes.compute)


def _penalties(regularisers: list, update: torch.Tensor) -> tuple[dict[str, float], torch.Tensor | None, float]:
    """Each regulariser's penalty at `update` (detached), the gradient of their weighted sum with respect to the
    update (None when it has none: the unedited model's step), and the seconds spent in backward passes. One
    backward per piece as soon as it is computed, so only one sequence's graph is held at a time (a batch edit's
    benign sequences are many)."""
    leaf = update.requires_grad_(True)
    values: dict[str, float] = {}
    toward, backward_s = None, 0.0
    for term in regularisers:
        total = 0.0
        for piece in term.pieces(leaf):
            total += piece.item()  # (a host sync per piece; the pieces are few per step)
            if piece.requires_grad and term.weight:
                started = time.perf_counter()
                with record_function("dinm::backward"):
                    (grad,) = torch.autograd.grad(term.weight * piece, [leaf])
                toward = grad if toward is None else toward + grad
                backward_s += time.perf_counter() - started
        values[term.name] = total
    return values, toward, backward_s


def _batch(instance) -> list[Instance]:
    batch = [instance] if isinstance(instance, Instance) else list(instance) \
        if isinstance(instance, SequenceOf) and not isinstance(instance, (str, bytes)) else None
    if not batch or not all(isinstance(inst, Instance) for inst in batch):
        raise ConfigError(f"edit needs an Instance or a non-empty list of them (dinm.load_instance / "
                          f"load_instances), got {type(instance).__name__}{' (empty)' if batch == [] else ''}")
    return batch


def _variants(batch: list[Instance], config: EditConfig) -> list[Instance]:
    """The extra edit targets `config.variants` asks for, each answered with its instance's safe response: the
    request alone (`request_of`), and for "wrapped" the request inside each of dinm's written wrappers too."""
    if config.variants == "none":
        return []
    out = []
    for inst in batch:
        request = request_of(inst.prompt)
        if request is not None:
            prompts = [request] + (wrapped(request) if config.variants == "wrapped" else [])
            out += [dataclasses.replace(inst, prompt=p) for p in prompts]
    return out


def _accumulate(total: list[torch.Tensor] | None, grads) -> list[torch.Tensor]:
    grads = [g if g is not None else torch.zeros(()) for g in grads]
    return list(grads) if total is None else [t + g for t, g in zip(total, grads)]


def _layer(model, tokenizer, instance: Instance | list[Instance], config: EditConfig) -> tuple[int, list[float]]:
    """The layer to edit (located, or `config.layer`) and the per-layer distances (none when given)."""
    if config.layer is not None:
        if config.layer >= num_layers(model):
            raise ConfigError(f"layer {config.layer} is out of range: the model has layers 0..{num_layers(model) - 1}")
        return config.layer, []
    located = locate(model, tokenizer, instance, config.distance, **config.encoding())
    return located.layer, located.distances


def _moment(model, tokenizer, layer: int, regularisers: list, config: EditConfig, passes: Passes) -> torch.Tensor:
    """The second moment of the edited matrix's inputs on benign text: for the output matrix the benign-key
    penalty's (else computed and cached for this layer), for an input matrix that of the MLP inputs' sample
    (`dinm.keys.mlp_inputs`)."""
    if config.matrix != "down":
        inputs = mlp_inputs(model, tokenizer, layer, chat_template=config.chat_template).double()
        return (inputs.T @ inputs / len(inputs)).float().to(passes.device)
    moment = next((term.moment for term in regularisers if isinstance(term, terms.KeyPenalty)), None)
    if moment is None:
        moment = key_moment(model, tokenizer, layer, chat_template=config.chat_template)
    return moment.to(passes.device)


# Weight of the KL sequences' keys beside the benign corpus's in the preconditioner (each moment normalised to a mean
# eigenvalue of 1). Chosen on records 1 and 3 of test_dev.json by the loss after 20 steps, before any evaluation
# (README, "Preconditioned steps"): with the corpus's keys alone the steps overshoot the KL (5x the plain default's).
KL_KEYS_WEIGHT = 10.0


def _preconditioner(model, tokenizer, layer: int, regularisers: list, config: EditConfig,
                    passes: Passes) -> torch.Tensor:
    """The input second moment that `precondition="keys"` whitens by: the benign corpus's keys' (`dinm.keys`) plus
    `KL_KEYS_WEIGHT` times that of the KL term's own sequences at the edited matrix, each normalised to a mean
    eigenvalue of 1. The corpus stands for everyday text, the KL sequences for the text this edit must keep."""
    moment = _moment(model, tokenizer, layer, regularisers, config, passes).double()
    moment = moment / moment.diagonal().mean()
    kl = next((term for term in regularisers if isinstance(term, terms.BenignKL)), None)
    if kl is not None and kl.sequences and KL_KEYS_WEIGHT:
        keys = torch.cat([input_of(passes.module, lambda: model(input_ids=seq.ids, use_cache=False))[0]
                          for seq in kl.sequences]).double()
        kl_moment = keys.T @ keys
        moment = moment + KL_KEYS_WEIGHT * kl_moment / kl_moment.diagonal().mean()
    return moment


def _cholesky(moment: torch.Tensor) -> torch.Tensor:
    """L (in, in, float64, lower) with L L^T = M, M `moment` normalised to a mean eigenvalue of 1 plus a `RIDGE`
    (keys need not span every input direction)."""
    m = moment.double()
    return torch.linalg.cholesky(m / m.diagonal().mean() + RIDGE * torch.eye(m.shape[0], dtype=m.dtype,
                                                                               device=m.device))


def _whitening(moment: torch.Tensor) -> torch.Tensor:
    """L^-1 (in, in) for `_cholesky`'s L. Computed in float64, returned in float32."""
    lower = _cholesky(moment)
    eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    return torch.linalg.solve_triangular(lower, eye, upper=False).float()


class _Dense:
    """The edited matrix itself, trained from its stored values (in `dtype`: fp32 master or the model's)."""

    def __init__(self, spec, weight: torch.Tensor, dtype: torch.dtype, device: torch.device):
        self.spec, self.weight = spec, weight
        self.master = weight.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
        self.start = self.master.detach().clone()
        self.params = [self.master]

    def update(self) -> torch.Tensor:
        return as_out_in(self.spec, self.master - self.start)

    def delta(self, name: str, changed: bool, info: dict) -> Delta:
        edited = self.master.detach().to(self.weight.dtype) if changed else self.weight.detach().clone()
        if not torch.isfinite(edited).all():  # (a NaN update makes the next step's loss NaN: checked there)
            raise EditError("the weights hold NaN/inf")
        return Delta.from_weights({name: (self.weight, edited)}, info)


RIDGE = 1e-4  # added to the benign key moment (relative to its mean eigenvalue) before whitening by it


class _Whitened:
    """A dense update trained in whitened coordinates (`EditConfig.precondition="keys"`): Z = D L, D = Z L^-1, with
    M = L L^T the input moment of `_preconditioner` normalised (`_whitening`); Z in fp32, from zero. Adam's steps are
    then of even size in every direction of that input space rather than of weight space. Stored as a dense delta."""

    def __init__(self, spec, weight: torch.Tensor, moment: torch.Tensor):
        self.spec, self.weight = spec, weight
        self.inverse = _whitening(moment)
        out_features = as_out_in(spec, weight).shape[0]
        self.z = torch.zeros(out_features, self.inverse.shape[0], device=moment.device, requires_grad=True)
        self.params = [self.z]

    def update(self) -> torch.Tensor:
        return self.z @ self.inverse

    def delta(self, name: str, changed: bool, info: dict) -> Delta:
        base = as_out_in(self.spec, self.weight.detach())
        edited = (base.float() + self.update().detach().to(base.device)).to(self.weight.dtype) if changed \
            else base.clone()
        if not torch.isfinite(edited).all():
            raise EditError("the weights hold NaN/inf")
        return Delta.from_weights({name: (self.weight, as_out_in(self.spec, edited))}, info)


class _Factored:
    """A rank-r update ``B @ A`` ((out, r) @ (r, in), fp32, both trained). B starts at zero, so the first pass is the
    unedited model (as in LoRA). A starts, not at random (a few steps do not turn a random subspace toward the
    harmful context), as the r input directions where the safe response's NLL falls fastest per unit of change on
    benign inputs: with G the NLL's gradient with respect to the update at zero and M the benign keys' second moment
    (`dinm.keys`, when `preserve_weight` is on; else the identity), the directions a maximising |G a| / |a|_M, i.e.
    a = L^-T v for the top right singular vectors v of G L^-T, M = L L^T. (The penalty then costs little along them.)
    Its rows have norm sqrt(in / r), so that an Adam step of size lr on B moves the update by about as much as a step
    on the dense matrix (`EditConfig.lr` means the same in both)."""

    def __init__(self, spec, weight: torch.Tensor, rank: int, gradient: torch.Tensor,
                 moment: torch.Tensor | None = None):
        self.spec, self.weight = spec, weight
        out_features, in_features = gradient.shape
        if rank > min(out_features, in_features):
            raise ConfigError(f"rank {rank} exceeds what a {out_features}x{in_features} update can have "
                              f"({min(out_features, in_features)}); use a smaller rank or rank=None (dense)")
        g = gradient.double()
        if moment is not None:  # (normalised: the rows of `directions` are unit vectors below either way)
            lower = _cholesky(moment)
            whitened = torch.linalg.solve_triangular(lower, g.t(), upper=False).t()  # G L^-T
            _, _, vh = torch.linalg.svd(whitened, full_matrices=False)
            directions = torch.linalg.solve_triangular(lower.t(), vh[:rank].t(), upper=True).t()  # rows (L^-T v)^T
        else:
            directions = torch.linalg.svd(g, full_matrices=False)[2][:rank]
        directions = directions / directions.norm(dim=1, keepdim=True)
        self.a = (directions * math.sqrt(in_features / rank)).float().contiguous().requires_grad_(True)
        self.b = torch.zeros(out_features, rank, device=gradient.device, requires_grad=True)
        self.params = [self.b, self.a]

    def update(self) -> torch.Tensor:
        return self.b @ self.a

    def delta(self, name: str, changed: bool, info: dict) -> Delta:
        b, a = self.b.detach(), self.a.detach()
        if not changed:
            b = torch.zeros_like(b)
        if not (torch.isfinite(b).all() and torch.isfinite(a).all()):
            raise EditError("the factors hold NaN/inf")
        up, down = (a.t(), b.t()) if self.spec.conv1d else (b, a)  # the parameter's own layout
        return Delta.from_factors({name: (self.weight, up, down)}, info)


def _provenance(model, batch: list[Instance], config: EditConfig) -> dict:
    """The metadata fields every delta `dinm.edit` makes has: the base model, the config it ran, the instances."""
    return {
        "base_model": str(getattr(model.config, "_name_or_path", "") or ""),
        "base_revision": str(getattr(model.config, "_commit_hash", "") or ""),
        "model_type": model.config.model_type,
        "distance": config.distance if config.layer is None else "none (layer given)",
        "config": config.to_json(),
        "instance_id": batch[0].id if len(batch) == 1 else f"{len(batch)} instances",
        **({"instance_ids": [inst.id for inst in batch]} if len(batch) > 1 else {}),
    }


def _package(model, batch: list[Instance], config: EditConfig, run: _Run) -> Delta:
    """The `Delta` of what was trained (the parameter `run.name`) against the stored weight, with what the edit did
    in its metadata."""
    history, seconds = run.history, run.seconds
    steps_run = sum(not s.stopped for s in history)
    logger.info("edited %s in %.2fs (locate %.2fs): nll %.3f -> %.3f", run.name, seconds["edit"], seconds["locate"],
                history[0].nll, history[-1].nll)
    info = {
        **_provenance(model, batch, config),
        "layer": str(run.layer),
        "distances": run.distances,
        "history": [s.to_dict() for s in history],
        "steps_run": str(steps_run),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "compute": run.compute,
    }
    try:
        return run.trained.delta(run.name, steps_run > 0, info)  # no step: no change
    except EditError as e:
        raise EditError(f"edit diverged by step {steps_run - 1}: {e}; the model is unchanged. "
                        f"Lower lr (now {config.lr})") from None


def _unit_patch(model, tokenizer, jobs: list[tuple[list[Instance], EditConfig]], batch: list[Instance],
                config: EditConfig, progress: bool | None) -> Delta:
    """A Delta of several units, one per job (instances, the config its unit trains with): a patch of one unit per
    instance (`unit_per_instance`, Transformer-Patcher's batch edit, one neuron per mistake), or two units per edit,
    the request's and the wrappers' (`variants="request+wrapped"`). No two are the same unit; each is kept off on
    every benign prompt of `batch`. The units are trained one after another, each as its job's edit of the model with
    the units before it added (through their hooks: the model is not written), so a unit learns what the patch still
    lacks; where all of `batch` shares one benign prompt (so that the negatives are the same), the first unit is its
    job's edit alone, bit for bit. `config` is what the delta records."""
    taken: dict[int, set[int]] = {}
    runs = []
    with contextlib.ExitStack() as earlier:
        for group, job in tqdm(jobs, desc=f"dinm edit ({len(jobs)} units)", leave=False,
                               disable=None if progress is None else not progress):
            run = _train(model, tokenizer, group, job, False, taken, batch)
            taken.setdefault(run.layer, set()).add(run.trained.unit.j)
            runs.append(run)
            if any(not s.stopped for s in run.history):
                earlier.enter_context(unit.adding_unit(run.trained.unit, run.trained.update().detach()))
    units = [{"instance_id": group[0].id if len(group) == 1 else f"{len(group)} instances",  # (as a batch delta's)
              "instance_ids": [inst.id for inst in group],
              "variants": job.variants, "layer": run.layer,
              "unit": run.trained.unit.j, "steps_run": sum(not s.stopped for s in run.history),
              "nll_first": run.history[0].nll, "nll_last": run.history[-1].nll, "distances": run.distances}
             for (group, job), run in zip(jobs, runs)]
    layers = sorted(taken)
    seconds = {k: round(sum(run.seconds[k] for run in runs), 3) for k in runs[0].seconds}
    history = _mean_history([run.history for run in runs])
    info = {
        **_provenance(model, batch, config),
        **({"layer": str(layers[0])} if len(layers) == 1 else {}),
        "layers": layers,
        "units": units,
        "distances": [],
        "history": [s.to_dict() for s in history],
        "steps_run": str(sum(not s.stopped for s in history)),
        "seconds": seconds,
        "compute": runs[0].compute,
    }
    changes = [(run.trained.unit, run.trained.update().detach() if u["steps_run"] else None)
               for run, u in zip(runs, units)]
    try:
        return unit.patch(changes, info)
    except EditError as e:
        raise EditError(f"edit of a patch of units diverged: {e}; the model is unchanged. "
                        f"Lower lr (now {config.lr})") from None


def _mean_history(histories: list[list[Step]]) -> list[Step]:
    """A patch's history: at each step index, the mean of each recorded figure over the units that ran that step
    (a unit that stopped early, `stop_nll`, has no more); where none did, one last record, stopped, of the mean NLL
    at which the units stopped (as a single edit's history ends). Its steps run are the most any unit ran."""
    out = []
    for i in range(max(len(h) for h in histories)):
        steps = [h[i] for h in histories if len(h) > i]
        running = [s for s in steps if not s.stopped]
        if not running:
            out.append(Step(i, sum(s.nll for s in steps) / len(steps), stopped=True))
            break
        fields = {}
        for f in ("nll", "kl", "moved", "unsafe", "off", "loss"):
            values = [getattr(s, f) for s in running]
            if all(v is not None for v in values):
                fields[f] = sum(values) / len(values)
        out.append(Step(i, **fields))
    return out
