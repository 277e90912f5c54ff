"""GPU benchmarks, one stage per call (benchmarks/gpu_check.sh runs them, each under a timeout), each appending its
figures, with the device's name, to a markdown file.

    python benchmarks/bench_gpu.py distances --out gpu_out/figures.md     # on a GPU
    python benchmarks/bench_gpu.py edit --out gpu_out/figures.md --dry-run  # tiny shapes on the CPU: the script runs

Stages (7B Llama shape: 32 layers, hidden 4096, MLP 11008, 32 heads, random weights, bf16):
  distances  `dinm.ops.layer_distances` over every layer's hidden states of two 600-token responses: time and
             achieved bandwidth (bytes of hidden states read / time) as a share of the device's peak.
  edit       one `dinm.edit` (the default config) of a 600-token instance on the whole model: seconds, and peak
             memory against the weights' size.
  generate   the evaluation's batched greedy generation (`dinm.generate.generate_ids`, batches of 16) against a
             loop of one prompt at a time: new tokens per second, 32 prompts, 64 new tokens each.
The tokenizer is the tests' small byte-level BPE (vocab 400, trained on data/examples.json; no download): the model's
vocabulary stays 32000, and only ids are generated, never decoded.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

# (name fragment, peak memory bandwidth in GB/s) from the vendors' data sheets, for the share of peak
PEAK_GBPS = (("H200", 4800), ("H100 SXM", 3350), ("H100 PCIe", 2000), ("H100", 3350), ("A100-SXM4-80GB", 2039),
             ("A100", 1555), ("L40S", 864), ("A10G", 600), ("RTX 4090", 1008))


def shapes(dry_run: bool) -> dict:
    if dry_run:
        return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=400, tokens=60)
    return dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, tokens=600)


def timed(fn, device: torch.device, repeat: int = 1) -> float:
    """Seconds per call (synchronised on a GPU)."""
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def stage_distances(device: torch.device, dry_run: bool) -> list[str]:
    from dinm import ops, twin

    s = shapes(dry_run)
    layers, tokens, width = s["num_hidden_layers"], s["tokens"], s["hidden_size"]
    g = torch.Generator(device=device).manual_seed(0)
    hidden = [torch.randn(2, tokens, width, device=device, dtype=torch.bfloat16, generator=g) for _ in range(layers)]
    mask = torch.ones(1, tokens, dtype=torch.bool, device=device)
    mask[:, :tokens // 3] = False  # the prompt's positions do not count
    seconds = timed(lambda: ops.layer_distances(hidden, mask, mask, "cosine"), device, repeat=20)
    twin_s = timed(lambda: twin.layer_distances(hidden, mask, mask, "cosine"), device, repeat=5)
    gbps = layers * 2 * tokens * width * 2 / seconds / 1e9  # every bf16 element read once
    peak = next((p for name, p in PEAK_GBPS if name in _device_name(device)), None)
    share = f"{100 * gbps / peak:.0f}% of the {peak} GB/s peak" if peak else "peak unknown for this device"
    return [f"- layer_distances ({ops.backend()}), {layers} layers x 2 x {tokens} tokens x {width} bf16: "
            f"{seconds * 1e3:.3f} ms, {gbps:.0f} GB/s ({share}); the PyTorch twin {twin_s * 1e3:.3f} ms"]


def _model(device: torch.device, dry_run: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    s = shapes(dry_run)
    config = LlamaConfig(**{k: v for k, v in s.items() if k != "tokens"}, max_position_embeddings=4096,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def _instance(tokenizer, tokens: int):
    """The example instance, its attack prompt repeated until prompt and safe response hold about `tokens`."""
    import dinm
    from dinm.text import encode_pair

    inst = dinm.load_instance(os.path.join(HERE, "..", "data", "example.json"))
    prompt = inst.prompt
    while len(encode_pair(tokenizer, prompt, inst.safe).ids) < tokens:
        prompt += " " + inst.prompt
    return dataclasses.replace(inst, prompt=prompt)


def stage_edit(device: torch.device, dry_run: bool) -> list[str]:
    import dinm
    from _results import layers_label
    from conftest import _tokenizer
    from dinm.text import encode_pair

    tok = _tokenizer()
    model = _model(device, dry_run)
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    inst = _instance(tok, shapes(dry_run)["tokens"])
    n = len(encode_pair(tok, inst.prompt, inst.safe).ids)
    config = dinm.EditConfig(steps=3) if dry_run else dinm.EditConfig()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    delta = dinm.edit(model, tok, inst, config, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    ran = delta.config  # (the default resolved: two units on a gated MLP)
    return [f"- edit ({ran.steps} steps of matrix={ran.matrix}, default config otherwise) of a {n}-token instance, "
            f"layer {layers_label(delta.layers)}: "
            f"{seconds:.1f} s (locate {delta.summary()['seconds']['locate']} s), peak memory {peak:.1f} GB for "
            f"{weights_gb:.1f} GB of weights ({peak / weights_gb:.2f}x)"]


def stage_generate(device: torch.device, dry_run: bool) -> list[str]:
    from conftest import _tokenizer
    from dinm.generate import generate_ids
    from dinm.text import encode_pair

    tok = _tokenizer()
    model = _model(device, dry_run)
    prompts = [encode_pair(tok, f"Question {i}: how do I plant {i} tomato seeds in spring?", "", add_end=False).ids
               for i in range(8 if dry_run else 32)]
    new = 8 if dry_run else 64
    with torch.no_grad():
        batched = timed(lambda: generate_ids(model, tok, prompts, max_new_tokens=new, batch_size=16), device)
        single = timed(lambda: [generate_ids(model, tok, [p], max_new_tokens=new, batch_size=1) for p in prompts],
                       device)
    total = len(prompts) * new
    return [f"- generation, {len(prompts)} prompts x {new} new tokens (greedy, no early stop in a random model): "
            f"batches of 16 {total / batched:.0f} tokens/s, one prompt at a time {total / single:.0f} tokens/s "
            f"({single / batched:.1f}x)"]


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"


STAGES = {"distances": stage_distances, "edit": stage_edit, "generate": stage_generate}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--out", required=True, help="markdown file the figures are appended to")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, on the CPU")
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA device (use --dry-run to check the script on the CPU)")
    os.environ.setdefault("DINM_CACHE", "off")
    lines = STAGES[args.stage](device, args.dry_run)
    header = (f"### {args.stage}: {_device_name(device)}, torch {torch.__version__}, "
              f"{datetime.datetime.now().isoformat(timespec='seconds')}")
    with open(args.out, "a", encoding="utf-8") as f:
        f.write("\n".join([header, *lines, ""]) + "\n")
    print("\n".join([header, *lines]))


if __name__ == "__main__":
    main()
