"""Benchmarks of issue 8 (`make bench`): every figure is a ratio to a baseline measured in the same run.

- ``python -m bench.checkpoints``: checkpoint upload/download against a plain copy and boto3's defaults.
- ``python -m bench.operator_scale``: N FineTuneJobs at once against the same objects made by a plain client.
- ``python -m bench.resume``: trainer start to first step, resumed from S3 against from scratch.
- ``python -m bench.plan_accuracy``: ``ftjob plan``'s memory estimate against measured peaks.
- ``python -m bench.report``: regenerates docs/benchmarks.md and docs/img/bench-*.png from bench/results/.

Each benchmark writes one JSON file under bench/results/ that carries the machine it ran on; the
report only reads those files, so a figure published from a long run stays until it is re-measured.
"""
