"""`dinm demo`: one real edit on the embedded model, before and after, side by side (`dinm.demo`)."""

import click

from ._common import one_line_errors


@click.command("demo")
@click.option("--instance", "instance_path", default="data/example.json", show_default=True,
              type=click.Path(dir_okay=False), help="The edit request.")
@click.option("--out", "out_dir", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the delta and the plot.")
@click.option("--max-new-tokens", default=60, show_default=True, help="Length of each greedy reply.")
@one_line_errors
def demo_cmd(instance_path, out_dir, max_new_tokens):
    """Edit the embedded SmolLM2-135M-Instruct so it refuses a harmful request; show replies before and after."""
    from dinm.demo import run

    report = run(instance_path, out_dir, max_new_tokens=max_new_tokens, say=click.echo)
    click.echo(report.text())
    if not report.restored:
        raise SystemExit(1)
