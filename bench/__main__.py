"""``python -m bench`` (``make bench``): every CPU benchmark at its default size, then the report.

One after another, never at the same time (they would share the machine's cores). ``FTJ_BENCH_SKIP``
leaves some out (``checkpoints,operator,resume,training,plan``); the size knobs are read by each benchmark
(see docs/benchmarks.md). Results of benchmarks that were skipped stay in bench/results/.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from bench import checkpoints, operator_scale, plan_accuracy, report, resume, training
from bench.common import log

STEPS: dict[str, Callable[[list[str]], int]] = {
    "checkpoints": checkpoints.main,
    "operator": operator_scale.main,
    "resume": resume.main,
    "training": training.main,
    "plan": plan_accuracy.main,
}


def main() -> int:
    skip = {name.strip() for name in os.environ.get("FTJ_BENCH_SKIP", "").split(",") if name.strip()}
    unknown = skip - set(STEPS)
    if unknown:
        raise SystemExit(f"FTJ_BENCH_SKIP={','.join(sorted(unknown))}: unknown; use {', '.join(STEPS)}")
    for name, step in STEPS.items():
        if name in skip:
            log(f"{name}: skipped (FTJ_BENCH_SKIP)")
            continue
        started = time.monotonic()
        log(f"{name}: start")
        step([])
        log(f"{name}: done in {(time.monotonic() - started) / 60:.1f} min")
    return report.main([])


if __name__ == "__main__":
    sys.exit(main())
