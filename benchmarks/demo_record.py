"""Record what ``hf-vitcompress demo`` prints, and how long it takes end to end, in RESULTS.md.

Runs the README's demo command exactly as written (``hf-vitcompress demo``, a fresh process, so the wall
time includes Python start-up and imports) and writes its printed table, the wall time and the
environment to ``benchmarks/demo_record.json`` and the ``demo`` section of ``benchmarks/RESULTS.md``.
The demo evaluates on the full 10,000 Fashion-MNIST test images when the data set is installed
(``apt-get install dataset-fashion-mnist``, or ``HF_VITCOMPRESS_FASHION_MNIST`` pointing at its IDX files),
else on the 2,000 shipped ones; the record says which.

    python benchmarks/demo_record.py            # ~1.5 min on 2 idle CPU cores
    python benchmarks/demo_record.py --render   # only rebuild the RESULTS.md section from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import HERE, run_environment, update_results_file

COMMAND = "python benchmarks/demo_record.py"
DEMO = ["hf-vitcompress", "demo"]


def run() -> dict:
    executable = shutil.which(DEMO[0]) or str(Path(sys.executable).with_name(DEMO[0]))
    environment = run_environment()  # before the run: the load average says how busy the machine was
    start = time.perf_counter()
    finished = subprocess.run(
        [executable, *DEMO[1:]], capture_output=True, text=True, cwd=HERE.parent, env={**os.environ}
    )
    wall = time.perf_counter() - start
    if finished.returncode != 0:
        sys.stderr.write(finished.stderr)
        raise SystemExit(f"`{' '.join(DEMO)}` failed with exit status {finished.returncode}")
    return {
        "command": " ".join(DEMO),
        "environment": environment,
        "wall_seconds": wall,
        "stdout": finished.stdout,
    }


def markdown(record: dict) -> str:
    environment = record["environment"]
    return "\n".join(
        [
            "## `hf-vitcompress demo` as the README runs it (`benchmarks/demo_record.py`)",
            "",
            f"Command: `{COMMAND}`, which runs `{record['command']}` in a fresh process ({environment['description']}). "
            f"Wall time end to end (start-up, imports, calibration, compression, evaluation): "
            f"**{record['wall_seconds']:.0f} s**. What it printed:",
            "",
            "```",
            record["stdout"].rstrip(),
            "```",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=str(HERE / "demo_record.json"))
    parser.add_argument("--render", action="store_true", help="only rebuild the RESULTS.md section from --json")
    args = parser.parse_args()
    if args.render:
        record = json.loads(Path(args.json).read_text())
    else:
        record = run()
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    text = markdown(record)
    print(text)
    update_results_file("demo", text)


if __name__ == "__main__":
    main()
