"""``ftjob validate`` on local files: the trainer's checks, the label balance, exit codes, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_operator.cli import main
from finetune_operator.cli.validate import label_balance

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[1] / "data"


def test_label_balance() -> None:
    records = [
        (1, {"label": True}),
        (2, {"label": True}),
        (3, {"label": True}),
        (4, {"label": True}),
        (5, {"label": False}),
        (7, {"other": 1}),
        (8, "not an object"),
    ]
    balance = label_balance(records)
    assert balance is not None
    assert balance.counts == {"true": 4, "false": 1}
    assert balance.missing_lines == [7]
    assert balance.rare_lines == [5]
    assert any(
        "label imbalance: label true occurs 4 times, false only 1 (4.0x; rare examples on lines 5)" in w
        for w in balance.warnings
    )
    assert any("1 records have no 'label' while others do (lines 7)" in w for w in balance.warnings)
    assert label_balance([(1, {"messages": []})]) is None
    even = label_balance([(1, {"label": "a"}), (2, {"label": "b"}), (3, {"label": "a"})])
    assert even is not None and even.warnings == []
    single = label_balance([(1, {"label": 1})])
    assert single is not None and "nothing to contrast" in single.warnings[0]


def test_valid_chat_data_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(DATA / "chat_small.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "[OK]" in out and "format messages" in out and "(estimated as characters/4)" in out


def test_errors_are_listed_with_line_numbers_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(DATA / "invalid" / "chat_errors.jsonl")]) == 1
    captured = capsys.readouterr()
    assert "line 2: messages[1].role is 'bot'" in captured.out
    assert "line 3: messages[1] is a second 'user' turn in a row" in captured.out
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "is not valid for sft" in last and " — fix the listed lines" in last


def test_preference_data_is_checked_for_dpo_without_being_told(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(DATA / "preference_small.jsonl"), "-o", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["method"], report["format"], report["ok"]) == ("dpo", "preference", True)
    assert report["n_examples"] == 40 and report["token_stats"]["estimated"] is True
    assert main(["validate", str(DATA / "preference_small.jsonl"), "--method", "sft"]) == 1


def test_over_long_duplicates_and_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row = {"prompt": "What is 2+2?", "completion": "4", "label": True}
    lines = [row, row, {**row, "completion": "x" * 400}, {**row, "prompt": "hi", "label": False}]
    lines += [{**row, "prompt": f"q{i}"} for i in range(4)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert main(["validate", str(path), "--max-seq-length", "32", "-o", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    issues = {(i["line"], i["severity"]): i["message"] for i in report["issues"]}
    assert "longer than maxSeqLength 32" in issues[(3, "error")]
    assert issues[(2, "warning")] == "duplicate of line 1"
    assert report["labels"]["counts"] == {"true": 7, "false": 1}
    assert report["labels"]["rare_lines"] == [4]


def test_unreadable_data_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["validate", str(tmp_path / "missing.jsonl")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: dataset file") and "not found" in err
