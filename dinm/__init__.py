"""dinm: detoxify a language model with one surgical DINM edit, kept as a small, revertible delta."""

__version__ = "0.1.0"

# The functions are bound after their modules are imported, so `dinm.edit` / `dinm.locate` are the
# functions, not the submodules of the same name.
from .config import EditConfig
from .delta import Delta
from .edit import edit
from .evaluate import evaluate
from .instance import Instance, load_instance, load_instances
from .locate import LocateResult, locate
from .models import load_model

__all__ = sorted(["Delta", "EditConfig", "Instance", "LocateResult", "__version__", "edit", "evaluate", "load_instance",
                  "load_instances", "load_model", "locate"])
