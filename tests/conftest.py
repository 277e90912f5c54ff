"""Tiny random models (Llama- and GPT-2-style) with a tiny byte-level tokenizer, all built offline."""

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
