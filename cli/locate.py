"""`dinm locate MODEL --instance q.json`"""

import click

from dinm.config import DISTANCES

from ._common import dtype_option, emit, json_option, load, model_argument, one_line_errors, trust_option


@click.command("locate")
@model_argument
@click.option("--instance", "instance_path", required=True, type=click.Path(dir_okay=False),
              help="JSON file: a SafeEdit record, the short form, or a list of them.")
@click.option("--index", default=0, show_default=True, help="Which record of the file to use.")
@click.option("--distance", type=click.Choice(list(DISTANCES)), help="Locate rule (default: the default edit's).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Also save a PNG of the distances.")
@dtype_option
@trust_option
@json_option
@one_line_errors
def locate_cmd(model, instance_path, index, distance, plot_path, dtype, trust_remote_code, as_json):
    """Print the toxic layer of MODEL for one instance and the distance of every layer."""
    from dinm import load_instance, locate

    instance = load_instance(instance_path, index)
    net, tokenizer = load(model, dtype, trust_remote_code)
    result = locate(net, tokenizer, instance, distance)
    distance = result.distance
    if plot_path:
        from dinm.plot import plot_distances

        plot_distances(result.distances, result.layer, plot_path, title=f"{model}: {distance} distance")
    emit(result.to_dict(), as_json,
         f"toxic layer: {result.layer} ({distance} distance)\n{result.chart()}")
