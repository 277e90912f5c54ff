"""Run the property tests of tests/test_fuzz.py with many examples (CI runs a bounded number) and record the
count and the result in benchmarks/RESULTS.md.

    python benchmarks/fuzz.py --examples 10000
"""

import argparse
import os
import subprocess
import sys
import time

from _results import record

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10000, help="examples per property")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    tests = os.path.join(HERE, "..", "tests", "test_fuzz.py")
    env = {**os.environ, "DINM_FUZZ_EXAMPLES": str(args.examples)}
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests,
                          "--hypothesis-show-statistics"], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    print(run.stdout[-4000:], run.stderr[-2000:])
    passing = [line.strip().removeprefix("- ") for line in run.stdout.splitlines() if " passing, " in line]
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else "no output"
    body = (f"{args.examples} examples per property (random, not derandomised), two properties: the delta reader "
            f"(random bytes, truncations, damaged bytes, headers lying about dtype/shape/offsets/metadata) returns a "
            f"valid delta — which then applies and reverts exactly or is refused — or raises a one-line DeltaError; "
            f"the instance parser (random JSON, records with the expected keys and random values) returns a valid "
            f"instance or raises a one-line InstanceError naming the file. While it was written, fuzzing found two "
            f"bugs, both fixed and kept as properties: a record id holding a newline made a two-line error, and a "
            f"damaged update that still produced the edited fingerprint applied fine but reverted inexactly (deltas "
            f"now carry a checksum of their own bytes, `delta_sha256`).\n\n"
            f"- result: `{summary}` (exit code {run.returncode}) in {seconds:.0f} s\n"
            + "".join(f"- {p}\n" for p in passing))
    if not args.no_write:
        record("Fuzzing the delta reader and the instance parser", body)
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
