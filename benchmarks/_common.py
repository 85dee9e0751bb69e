"""What the benchmark scripts share: writing their section of RESULTS.md."""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent


def update_results_file(name: str, section: str, path: Path = HERE / "RESULTS.md") -> None:
    """Replace the ``name`` section of RESULTS.md (between its markers), keeping the other benchmarks' sections."""
    marker_start, marker_end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{marker_start}\n{section}\n{marker_end}"
    text = (
        path.read_text()
        if path.exists()
        else "# Benchmark results\n\nEvery figure here was produced by the command named in its section.\n"
    )
    if marker_start in text:
        text = re.sub(re.escape(marker_start) + ".*?" + re.escape(marker_end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
