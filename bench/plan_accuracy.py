"""``ftjob plan``'s memory estimate against the measured peak of real CPU training runs.

    python -m bench.plan_accuracy [--configs lora-fp32-logits,qlora-nf4]

The configurations and the measuring process are those of tests/trainer/test_plan_accuracy.py
(which asserts a 15 % tolerance); this tabulates the same comparison with every term of the
estimate, so the page shows how close the planner is and where its bytes go. Estimate:
:func:`finetune_operator.memory.estimate` with ``device="cpu"``. Measured: peak resident memory of
the training process above its resident memory before the model is loaded (see the test's
docstring for why).
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Any

from bench.common import WORK, Run, log
from finetune_operator.memory import MiB, estimate
from tests.trainer.test_plan_accuracy import COMMON, CONFIGS, run_script, setup_of, shape_of


def measure(name: str) -> dict[str, Any]:
    folder = WORK / "plan" / name
    shutil.rmtree(folder, ignore_errors=True)
    spec = {**CONFIGS[name], **COMMON, "model_dir": str(folder / "model"), "workdir": str(folder / "work")}
    run_script("prepare", spec)
    result = run_script("measure", spec)
    predicted = estimate(shape_of(spec), setup_of(spec))
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "case": name,
        "spec": CONFIGS[name],
        "estimate_mib": predicted.total / MiB,
        "measured_mib": (result["peak"] - result["baseline"]) / MiB,
        "terms_mib": {k: v / MiB for k, v in predicted.terms.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plan_accuracy", description=__doc__)
    parser.add_argument(
        "--configs",
        default=os.environ.get("FTJ_BENCH_PLAN_CONFIGS") or ",".join(CONFIGS),
        help="comma-separated names from the test (FTJ_BENCH_PLAN_CONFIGS; default all)",
    )
    args = parser.parse_args(argv)
    what = (
        "CPU runs (fp32, one process, 2 optimizer steps of the trainer's SFT recipe, LoRA r=16) of "
        "Llama shapes built from a config; configurations from tests/trainer/test_plan_accuracy.py."
    )
    run = Run("plan-accuracy", "cpu", {"configs": args.configs.split(","), "what": what})
    rows = []
    for name in args.configs.split(","):
        row = measure(name)
        log(f"{name}: estimate {row['estimate_mib']:.0f} MiB, measured {row['measured_mib']:.0f} MiB")
        rows.append(row)
    run.data["rows"] = rows
    run.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
