"""Loading data from real sources (files, pvc://, a real S3 server, the Hub offline) into what TRL takes."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finetune_devenv.s3server import S3Server
from finetune_trainer.data import (
    DataSourceError,
    DataValidationError,
    check_dataset,
    load_datasets,
    make_token_counter,
    validate_main,
)
from finetune_trainer.data_checks import Method
from finetune_trainer.runconfig import DatasetConfig, ExitCode
from finetune_trainer.s3 import ObjectStore
from tests.support.tiny_model import build_tokenizer

pytestmark = pytest.mark.trainer

DATA = Path(__file__).resolve().parents[1] / "data"
SMALL: dict[str, tuple[Method, str, int, list[str]]] = {
    "chat_small.jsonl": ("sft", "messages", 42, ["messages"]),
    "alpaca_small.jsonl": ("sft", "instruction", 20, ["messages"]),
    "prompt_completion_small.jsonl": ("sft", "prompt_completion", 20, ["prompt", "completion"]),
    "preference_small.jsonl": ("dpo", "preference", 40, ["prompt", "chosen", "rejected"]),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_shipped_examples_load_into_trl_ready_datasets(name: str, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    method, fmt, count, columns = SMALL[name]
    path = DATA / name
    loaded = load_datasets(DatasetConfig(train=str(path), eval_fraction=0.1), method)

    report = loaded.report
    assert (report.format, report.n_examples, report.n_errors, report.n_warnings) == (fmt, count, 0, 0)
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.eval is not None
    assert (len(loaded.train), len(loaded.eval)) == (count - round(count * 0.1), round(count * 0.1))
    assert loaded.train.column_names == columns
    # TRL's own formatting accepts every example as it is.
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    example = loaded.train[0]
    assert is_conversational(example) == (fmt != "prompt_completion")
    rendered = maybe_apply_chat_template(example, tokenizer)
    assert all(isinstance(v, str) and v for v in rendered.values())


def test_file_uri_and_pvc_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    claim = tmp_path / "pvc" / "team-data" / "sft"
    claim.mkdir(parents=True)
    (claim / "train.jsonl").write_bytes((DATA / "chat_small.jsonl").read_bytes())
    monkeypatch.setenv("FTJ_PVC_ROOT", str(tmp_path / "pvc"))

    for uri in ("pvc://team-data/sft/train.jsonl", f"file://{claim / 'train.jsonl'}"):
        checked = check_dataset(DatasetConfig(train=uri), "sft")
        assert (checked.report.ok, len(checked.train), checked.eval) == (True, 42, None)

    with pytest.raises(
        DataSourceError, match=r"pvc://team-data/nope.jsonl not found: .*under \$FTJ_PVC_ROOT"
    ):
        check_dataset(DatasetConfig(train="pvc://team-data/nope.jsonl"), "sft")
    with pytest.raises(DataSourceError, match="is a directory"):
        check_dataset(DatasetConfig(train="pvc://team-data/sft"), "sft")
    with pytest.raises(DataSourceError, match="unsupported scheme 'gs'"):
        check_dataset(DatasetConfig(train="gs://bucket/train.jsonl"), "sft")


def test_s3_source_plain_and_gzip(s3_server: S3Server, s3_bucket: str) -> None:
    store = ObjectStore(env=s3_server.env())
    raw = (DATA / "preference_small.jsonl").read_bytes()
    store.put_bytes(f"s3://{s3_bucket}/data/pref.jsonl", raw)
    store.put_bytes(f"s3://{s3_bucket}/data/pref.jsonl.gz", gzip.compress(raw))

    plain = check_dataset(DatasetConfig(train=f"s3://{s3_bucket}/data/pref.jsonl"), "dpo", store=store)
    packed = check_dataset(DatasetConfig(train=f"s3://{s3_bucket}/data/pref.jsonl.gz"), "dpo", store=store)

    assert plain.report.ok and packed.report.ok
    assert plain.report.sha256 == hashlib.sha256(raw).hexdigest()
    assert plain.train == packed.train
    assert len(plain.train) == 40


def test_s3_source_errors(s3_server: S3Server, s3_bucket: str) -> None:
    store = ObjectStore(env=s3_server.env())
    with pytest.raises(
        DataSourceError, match=r"cannot read the dataset: S3 download of s3://.*: no such object"
    ):
        check_dataset(DatasetConfig(train=f"s3://{s3_bucket}/missing.jsonl"), "sft", store=store)
    with pytest.raises(DataSourceError, match="names a prefix; name the JSONL object itself"):
        check_dataset(DatasetConfig(train=f"s3://{s3_bucket}/data/"), "sft", store=store)


def test_separate_eval_file(tmp_path: Path) -> None:
    train, evaluation = str(DATA / "chat_small.jsonl"), str(DATA / "alpaca_small.jsonl")
    good = check_dataset(DatasetConfig(train=train, eval=train), "sft")
    assert (good.report.ok, good.report.n_train, good.report.n_eval) == (True, 42, 42)
    assert good.report.eval is not None and good.report.eval.source == train

    mixed = check_dataset(DatasetConfig(train=train, eval=evaluation), "sft")
    assert mixed.report.eval is not None
    assert [i.message for i in mixed.report.eval.errors()] == [
        "the eval data is in instruction format but the training data in messages; use one format for both"
    ]
    both = check_dataset(DatasetConfig(train=train, eval=train, eval_fraction=0.1), "sft")
    assert [i.message for i in both.report.errors()] == [
        "set either dataset.eval or dataset.evalFraction, not both"
    ]


def test_too_few_examples(tmp_path: Path) -> None:
    config = DatasetConfig(train=str(DATA / "chat_small.jsonl"), eval_fraction=0.1, min_examples=100)
    assert [i.message for i in check_dataset(config, "sft").report.errors()] == [
        "only 38 valid training examples after holding out 4 for evaluation; dataset.minExamples is 100"
    ]
    one = tmp_path / "one.jsonl"
    one.write_text((DATA / "chat_small.jsonl").read_text().splitlines()[0] + "\n")
    split = check_dataset(DatasetConfig(train=str(one), eval_fraction=0.5), "sft")
    assert [i.message for i in split.report.errors()] == [
        "no training examples left after holding out 1 for evaluation; "
        "lower dataset.evalFraction or add examples"
    ]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert [i.message for i in check_dataset(DatasetConfig(train=str(empty)), "sft").report.errors()] == [
        "the data holds no examples"
    ]


@pytest.mark.parametrize(
    ("name", "method", "lines"),
    [
        ("chat_errors.jsonl", "sft", [2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 13]),
        ("preference_errors.jsonl", "dpo", [2, 3, 4, 5]),
        ("json_array.jsonl", "sft", [1]),
    ],
)
def test_shipped_invalid_examples(name: str, method: Method, lines: list[int]) -> None:
    with pytest.raises(DataValidationError) as info:
        load_datasets(DatasetConfig(train=str(DATA / "invalid" / name)), method)
    assert [i.line for i in info.value.report.errors()] == lines
    assert f"line {lines[0]}: " in str(info.value)


def test_token_counter_from_a_real_tokenizer(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    count = make_token_counter(tokenizer)
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    rendered: Any = tokenizer.apply_chat_template(messages, tokenize=True)
    assert count(messages) == len(rendered["input_ids"])
    assert count("2 + 2 =") == len(tokenizer("2 + 2 =")["input_ids"]) + 1  # TRL appends EOS

    everything = check_dataset(
        DatasetConfig(train=str(DATA / "chat_small.jsonl")), "sft", token_counter=count
    )
    lengths = sorted(count(e["messages"]) for e in everything.train)
    limit = lengths[len(lengths) // 2]
    checked = check_dataset(
        DatasetConfig(train=str(DATA / "chat_small.jsonl"), max_seq_length=limit), "sft", token_counter=count
    )
    stats = checked.report.token_stats
    assert stats is not None and not stats.estimated
    assert (stats.min, stats.max) == (lengths[0], lengths[-1])  # over-long examples are measured too
    assert checked.report.n_errors == sum(n > limit for n in lengths) > 0
    assert len(checked.train) == sum(n <= limit for n in lengths)
    assert all(f"tokens, longer than maxSeqLength {limit}" in i.message for i in checked.report.errors())


def test_validate_cli(tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chat = str(DATA / "chat_small.jsonl")
    assert validate_main([chat, "--method", "sft", "--eval-fraction", "0.1"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "format messages, 42 valid of 42 records, 0 errors, 0 warnings" in out
    assert "split: 38 train / 4 eval" in out

    assert validate_main([chat, "--method", "dpo", "--json"]) == ExitCode.INVALID_DATA
    captured = capsys.readouterr()
    report: dict[str, Any] = json.loads(captured.out)
    assert (report["ok"], report["format"], report["n_errors"]) == (False, "messages", 1)
    assert "The data is not valid for dpo." in captured.err

    args = [chat, "--tokenizer", str(tokenizer_dir), "--max-seq-length", "16"]
    assert validate_main(args) == ExitCode.INVALID_DATA
    out = capsys.readouterr().out
    assert "tokens, longer than maxSeqLength 16" in out and "estimated" not in out

    assert validate_main([str(DATA / "nope.jsonl")]) == ExitCode.INPUT_UNREADABLE
    assert "not found" in capsys.readouterr().err
    assert validate_main([chat, "--eval-fraction", "1.5"]) == ExitCode.INVALID_CONFIG


def test_hub_dataset_offline_says_what_to_do(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    code = (
        "import sys; from finetune_trainer.data import validate_main; sys.exit(validate_main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "hf://no-org/no-such-dataset@main"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == ExitCode.INPUT_UNREADABLE, done.stderr
    assert "cannot load hf://no-org/no-such-dataset@main from the Hugging Face Hub" in done.stderr
    assert "HF_HUB_OFFLINE is set, so only datasets in the local cache load" in done.stderr
    assert "Copy the data to s3:// or a PVC as JSONL" in done.stderr
