"""Tiny random models (Llama- and GPT-2-style) with a tiny byte-level tokenizer, all built offline; the embedded
SmolLM2-135M-Instruct, loaded once per run; deltas made without an edit; SGD in place of the edit's Adam."""

import json
import os

import pytest
import torch

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|end|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(os.path.join(DATA, "examples.json"), encoding="utf-8") as f:
        corpus = [json.dumps(r) for r in json.load(f)]
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|end|>", pad_token="<|end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def _gpt2(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=1024)
    return GPT2LMHeadModel(cfg).eval()


BUILDERS = {"llama": _llama, "gpt2": _gpt2}


@pytest.fixture(autouse=True)
def _no_disk_cache(monkeypatch):
    """Key statistics are computed in each test rather than read from an earlier run's files (and no test writes
    to the user's cache); tests of the disk cache point DINM_CACHE at a folder of their own."""
    monkeypatch.setenv("DINM_CACHE", "off")


@pytest.fixture(autouse=True)
def _own_replies(request):
    """Each test generates its edits' own benign replies (`dinm.terms.own_replies` keeps them per model state, and a
    fresh tiny model can reuse a freed one's address), except the embedded model's tests, which share that one
    model's replies as a user's sweep in one process would."""
    if "smol" not in request.fixturenames:
        from dinm import terms

        terms.forget_replies()


@pytest.fixture(scope="session")
def tokenizer():
    return _tokenizer()


@pytest.fixture(params=sorted(BUILDERS))
def tiny(request, tokenizer):
    """(model, tokenizer) for each tiny architecture, fresh for each test."""
    return BUILDERS[request.param](len(tokenizer)), tokenizer


@pytest.fixture
def llama(tokenizer):
    return _llama(len(tokenizer)), tokenizer


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tokenizer):
    """A tiny Llama saved as a Hugging Face folder, for the CLI."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    _llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def smol_cache(tmp_path_factory):
    """The dinm cache folder the embedded model is loaded with (its kept conversion: `dinm.models`), the run's own."""
    return str(tmp_path_factory.mktemp("dinm-cache"))


@pytest.fixture(scope="session")
def smol(smol_cache):
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, loaded once per run from its GGUF file (about 20 s
    on 2 cores), which keeps its conversion in `smol_cache` (not in the user's cache).
    Shared by every test that asks for it: a test may apply a delta but must revert it (`same_state` checks).
    Not skipped when missing: `make test` installs it, and a missing model must fail loudly."""
    import dinm

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DINM_CACHE", smol_cache)
        return dinm.load_model("embedded")


@pytest.fixture
def sgd(monkeypatch):
    """`dinm.edit` steps with plain SGD (same lr and weight decay) instead of Adam.

    Adam's step is about lr * sign(g) per element: a gradient element near 0 that rounding flips changes that
    element by ~lr, so two computations of the same edit that differ only by roundoff can differ by ~lr in a few
    elements. SGD's step is linear in the gradient, so the deltas of two such computations differ by the
    relative size of their gradients' difference, which fp32/bf16 roundoff bounds; tests comparing two ways of
    computing one edit use it."""
    def factory(params, lr, weight_decay=0.0, **_ignored):  # (`fused`, Adam's betas and eps do not apply)
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)

    monkeypatch.setattr(torch.optim, "Adam", factory)


@pytest.fixture(scope="session")
def instance():
    import dinm

    return dinm.load_instance(os.path.join(DATA, "example.json"))


@pytest.fixture(scope="session")
def other_instance():
    import dinm

    return dinm.load_instances(os.path.join(DATA, "examples.json"))[1]


def state(model):
    """A bit-exact snapshot of every parameter and buffer."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, snapshot) -> bool:
    now = model.state_dict()
    return now.keys() == snapshot.keys() and all(
        now[k].dtype == v.dtype and torch.equal(now[k].view(-1).view(torch.uint8) if now[k].numel() else now[k],
                                                v.view(-1).view(torch.uint8) if v.numel() else v)
        for k, v in snapshot.items())


def make_delta(model, layer: int = 1, *, seed: int = 0, scale: float = 1e-2, config=None,
               instance_id: str = "made-by-the-tests", rank: int | None = None, matrix: str = "down"):
    """A `Delta` of layer `layer`'s MLP output weight (or its `matrix`: `dinm.arch.matrix_name`), made without an
    edit: a seeded random update of `scale` times the weight's RMS per element, in the weight's dtype, with the
    metadata `dinm.edit` writes (the `config` given, `EditConfig.dense(matrix=matrix)` by default; a made-up, decreasing loss history). With `rank`, a factored delta whose
    random factors give elements of about that size. For the tests of what a delta does (apply, revert, files,
    checkpoints, evaluation, export) rather than of how an edit computes it."""
    from dinm import Delta, EditConfig
    from dinm.arch import matrix_name
    from dinm.placement import stored

    config = config or EditConfig.dense(matrix=matrix)
    name = matrix_name(model, layer, matrix)
    base = stored(model, name).detach()  # (an offloaded weight's values, as edit reads them)
    g = torch.Generator().manual_seed(seed)
    size = scale * base.float().pow(2).mean().sqrt().item()
    history = [{"step": i, "nll": 2.0 - 0.1 * i, "kl": 0.01 * i, "loss": 2.0 - 0.09 * i}
               for i in range(config.steps)]
    if rank is not None:  # (up @ down has elements of about `size`: each term is (size / sqrt(rank)) * 1)
        up = torch.randn(base.shape[0], rank, generator=g) * (size / rank ** 0.5)
        down = torch.randn(rank, base.shape[1], generator=g)
        make, edits = Delta.from_factors, {name: (base, up, down)}
    else:
        noise = torch.randn(base.shape, generator=g) * size
        edited = (base.float() + noise.to(base.device)).to(base.dtype)
        make, edits = Delta.from_weights, {name: (base, edited)}
    return make(edits, {
        "base_model": str(getattr(model.config, "_name_or_path", "") or ""),
        "base_revision": str(getattr(model.config, "_commit_hash", "") or ""),
        "model_type": model.config.model_type,
        "layer": str(layer),
        "distance": "none (layer given)",
        "distances": [],
        "config": config.to_json(),
        "history": history,
        "steps_run": str(config.steps),
        "instance_id": instance_id,
        "seconds": {"locate": 0.0, "edit": 0.0},
    })


def checkpoint_tensors(folder):
    """Every tensor of a checkpoint folder, read through its index (what a loader sees)."""
    from safetensors.torch import load_file

    from dinm import checkpoint

    weight_map, _ = checkpoint.layout(str(folder))
    out = {}
    for shard in set(weight_map.values()):
        out.update(load_file(os.path.join(folder, shard)))
    return out
