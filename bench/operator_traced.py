"""Experiment, not the operator: ``python -m finetune_operator`` under ``tracemalloc``, to find where
its memory goes at scale (``bench.operator_scale`` phase ``operator-traced``).

On SIGUSR1 it writes the largest allocation sites still alive (grouped by file and line, with the
total) as JSON to ``$FTJ_BENCH_TRACEMALLOC_OUT``. Tracing slows the operator down: its times are not
comparable with the other phases, only its memory breakdown is of interest.

    python -m bench.operator_traced --namespace NS --standalone   # same arguments as the operator
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

from finetune_operator.__main__ import main

OUT_ENV = "FTJ_BENCH_TRACEMALLOC_OUT"
TOP = 30


def dump(_signum: int, _frame: FrameType | None) -> None:
    snapshot = tracemalloc.take_snapshot()
    by_line = snapshot.statistics("lineno")
    by_file = snapshot.statistics("filename")
    report = {
        "traced_mib": sum(s.size for s in by_line) / 2**20,
        "lines": [
            {"where": str(s.traceback), "mib": s.size / 2**20, "blocks": s.count} for s in by_line[:TOP]
        ],
        "files": [{"where": str(s.traceback), "mib": s.size / 2**20} for s in by_file[:TOP]],
    }
    out = Path(os.environ[OUT_ENV])
    out.with_suffix(".tmp").write_text(json.dumps(report, indent=1))
    out.with_suffix(".tmp").replace(out)


if __name__ == "__main__":
    tracemalloc.start(1)
    signal.signal(signal.SIGUSR1, dump)
    sys.exit(main())
