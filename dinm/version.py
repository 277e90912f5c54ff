"""dinm's version: its own module, so that code writing it into a file (`dinm.delta`) imports no package root."""

__version__ = "0.9.0"
