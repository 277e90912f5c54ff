"""Loading the embedded model, as a `dinm` command pays it: each load in a fresh process, timed from the call of
`dinm.load_model("embedded")` to its return (the imports before it are timed apart). Three cases: no cache
(`DINM_CACHE=off`: the GGUF file converted, as before dinm kept the conversion), an empty cache (converted, then
kept), and the kept conversion read back (its files' SHA-256 checked first).

    python benchmarks/bench_load.py            # writes its section of RESULTS.md
    python benchmarks/bench_load.py --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _results import record  # noqa: E402

CHILD = """
import json, time
started = time.perf_counter()
import dinm, torch, transformers
imported = time.perf_counter()
dinm.load_model("embedded")
print(json.dumps({"import_s": imported - started, "load_s": time.perf_counter() - imported}))
"""


def load_once(cache: str) -> dict:
    env = {**os.environ, "DINM_CACHE": cache}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="loads of the kept conversion")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dinm-bench-load-") as cache:
        rows = [("no cache (`DINM_CACHE=off`): the GGUF file converted", load_once("off")),
                ("empty cache: converted, then kept", load_once(cache))]
        size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(cache) for name in names)
        rows += [(f"the kept conversion read back (run {i + 1})", load_once(cache)) for i in range(args.repeats)]
    lines = ["| load | `load_model` s | imports s |", "|---|---|---|"]
    lines += [f"| {what} | {r['load_s']:.2f} | {r['import_s']:.2f} |" for what, r in rows]
    body = ("\n".join(lines) + f"\n\nThe kept conversion takes {size / 1e6:.0f} MB in the cache. Each row is one "
            "fresh process, nothing else running.")
    print(body)
    if not args.no_write:
        record("Loading the embedded model: the kept conversion", body)


if __name__ == "__main__":
    main()
