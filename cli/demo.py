"""`dinm demo`: one real edit on the embedded model, before and after, side by side."""

import click

from ._common import format_distances, one_line_errors


def _show(title: str, prompts: list[tuple[str, str]], before: list[str], after: list[str] | None = None) -> None:
    from dinm.judge import is_refusal

    click.echo(f"\n=== {title}")
    for i, (label, prompt) in enumerate(prompts):
        click.echo(f"\n[{label}] {prompt}")
        for tag, replies in (("before", before), ("after ", after)):
            if replies is not None:
                flag = "REFUSES " if is_refusal(replies[i]) else "answers "
                click.echo(f"  {tag} {flag}| {replies[i]!r}")


@click.command("demo")
@click.option("--instance", "instance_path", default="data/example.json", show_default=True,
              type=click.Path(dir_okay=False), help="The edit request.")
@click.option("--out", "out_dir", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the delta and the plot.")
@click.option("--max-new-tokens", default=60, show_default=True, help="Length of each greedy reply.")
@one_line_errors
def demo_cmd(instance_path, out_dir, max_new_tokens):
    """Edit the embedded SmolLM2-135M-Instruct so it refuses a harmful request; show replies before and after."""
    import os
    import time

    import dinm
    from dinm.delta import fingerprint
    from dinm.generate import generate
    from dinm.models import EMBEDDED

    instance = dinm.load_instance(instance_path)
    os.makedirs(out_dir, exist_ok=True)
    click.echo("loading the embedded model (SmolLM2-135M-Instruct, GGUF) ...")
    model, tokenizer = dinm.load_model(EMBEDDED)
    prompts = [("adversarial prompt", instance.prompt), ("benign prompt", instance.benign_prompt)]
    prompts += [(f"held out: {k}", v) for k, v in instance.generalization.items()]
    texts = [p for _, p in prompts]

    before = generate(model, tokenizer, texts, max_new_tokens=max_new_tokens)
    config = dinm.EditConfig()
    started = time.perf_counter()
    delta = dinm.edit(model, tokenizer, instance, config, progress=True)
    seconds = time.perf_counter() - started
    path = os.path.join(out_dir, "delta.safetensors")
    delta.save(path)
    plot = os.path.join(out_dir, "distances.png")
    from dinm.plot import plot_distances

    plot_distances(delta.distances, delta.layer, plot, title=f"SmolLM2-135M-Instruct, {config.distance} distance "
                                                              f"(toxic layer {delta.layer})")
    name = delta.names[0]
    base_sha = fingerprint(model.get_parameter(name))

    delta.apply(model)
    after = generate(model, tokenizer, texts, max_new_tokens=max_new_tokens)
    delta.revert(model)
    restored = fingerprint(model.get_parameter(name)) == base_sha

    _show("greedy replies, same prompts before and after the edit", prompts, before, after)
    h, timing = delta.history, delta.summary().get("seconds", {})
    click.echo(f"\n=== the edit\nlocated layer {delta.layer} ({config.distance} distance over 30 layers):")
    click.echo(format_distances(delta.distances, delta.layer))
    click.echo(f"edited {name}: {config.steps} steps in {seconds:.1f}s (locate {timing.get('locate')}s, "
               f"edit {timing.get('edit')}s), "
               f"safe-response NLL {h[0]['nll']:.3f} -> {h[-1]['nll']:.3f}, benign KL {h[-1]['kl']:.4f}")
    click.echo(f"delta: {path} ({os.path.getsize(path) / 1e6:.2f} MB, only the edited tensor); plot: {plot}")
    click.echo(f"revert restored the original weights bit for bit: {'yes' if restored else 'NO'}")
    if not restored:
        raise SystemExit(1)
