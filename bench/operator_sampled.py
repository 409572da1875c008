"""Experiment, not the operator: ``python -m finetune_operator`` with a sampling profiler, to find
where its CPU goes at scale (``bench.operator_scale`` phase ``operator-sampled``; py-spy is not in
the project's environment).

A thread samples every thread's stack every 5 ms (``sys._current_frames``); samples whose innermost
frame is a blocking call (waiting for the API server, for work, for an event) are counted apart. On
SIGUSR1 it writes the functions seen most often, innermost (self) and anywhere on the stack
(inclusive), as JSON to ``$FTJ_BENCH_TRACEMALLOC_OUT`` (the path the benchmark passes).

    python -m bench.operator_sampled --namespace NS --standalone   # same arguments as the operator
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from finetune_operator.__main__ import main

OUT_ENV = "FTJ_BENCH_TRACEMALLOC_OUT"
TOP = 40
INTERVAL = 0.005
BLOCKING = frozenset(
    {"select", "poll", "wait", "acquire", "recv_into", "readinto", "_recv_into", "sleep", "get", "accept"}
)

samples = {"total": 0, "blocked": 0}
self_counts: collections.Counter[str] = collections.Counter()
inclusive: collections.Counter[str] = collections.Counter()


def where(frame: FrameType) -> str:
    code = frame.f_code
    path = code.co_filename
    short = path.split("site-packages/")[-1] if "site-packages/" in path else path.split("/work/main/")[-1]
    return f"{short}:{code.co_name}"


def sample_forever() -> None:
    me = threading.get_ident()
    while True:
        time.sleep(INTERVAL)
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            samples["total"] += 1
            if frame.f_code.co_name in BLOCKING:
                samples["blocked"] += 1
                continue
            self_counts[where(frame)] += 1
            seen = set()
            node: FrameType | None = frame
            while node is not None:
                name = where(node)
                if name not in seen:
                    inclusive[name] += 1
                    seen.add(name)
                node = node.f_back


def dump(_signum: int, _frame: FrameType | None) -> None:
    busy = max(1, samples["total"] - samples["blocked"])
    report = {
        "samples": samples,
        "self": [{"where": k, "share": v / busy} for k, v in self_counts.most_common(TOP)],
        "inclusive": [{"where": k, "share": v / busy} for k, v in inclusive.most_common(TOP)],
    }
    out = Path(os.environ[OUT_ENV])
    out.with_suffix(".tmp").write_text(json.dumps(report, indent=1))
    out.with_suffix(".tmp").replace(out)


if __name__ == "__main__":
    threading.Thread(target=sample_forever, name="sampler", daemon=True).start()
    signal.signal(signal.SIGUSR1, dump)
    sys.exit(main())
