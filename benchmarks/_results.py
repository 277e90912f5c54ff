"""Write a benchmark's measured figures into benchmarks/RESULTS.md, one section per script, with the command,
the machine and the date (a re-run replaces its own section)."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def machine() -> str:
    import torch

    from dinm.passes import native_bf16  # the check `compute_dtype="auto"` makes

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU only ({os.cpu_count()} cores)"
    capability = (f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
                  f"{'yes' if native_bf16(torch.device('cpu')) else 'no'}")
    return f"{cpu}; {device}; {capability}; torch {torch.__version__}; Python {platform.python_version()}"


def layers_label(layers: list[int]) -> str:
    """The layers an edit changed, for a table: "22", or "22+23" for a patch of units in several layers."""
    return "+".join(map(str, layers))


def record(section: str, body: str) -> None:
    """Replace (or append) `## section` in RESULTS.md with `body` plus how it was made."""
    command = shlex.join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:])  # (quoted: it can be rerun)
    text = (f"## {section}\n\n- command: `{command}`\n- machine: {machine()}\n"
            f"- date: {datetime.date.today().isoformat()}\n\n{body.strip()}\n\n")
    old = open(RESULTS, encoding="utf-8").read() if os.path.exists(RESULTS) else "# Benchmark results\n\n"
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    with open(RESULTS, "w", encoding="utf-8") as f:
        f.write(new.rstrip("\n") + "\n")
    print(f"wrote section '{section}' of {os.path.relpath(RESULTS)}")


def arguments(doc: str, limit: int) -> argparse.Namespace:
    """The options every benchmark takes: the SafeEdit file, how many records, and whether to write."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--data", default="../shared/safeedit/test_dev.json")
    parser.add_argument("--limit", type=int, default=limit)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    return parser.parse_args()
