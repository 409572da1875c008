"""Dataset checks and normalisation (pure: JSONL bytes in, examples and a report out).

One row per invalid case, with the exact line numbers the user will be shown.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from finetune_trainer.data import split_examples
from finetune_trainer.data_checks import (
    DatasetReport,
    DataValidationError,
    Method,
    Text,
    TokenCounter,
    check_examples,
    detect_format,
    estimate_tokens,
    parse_jsonl,
    summarize,
)
from finetune_trainer.runconfig import DatasetFormat

pytestmark = pytest.mark.unit


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


CHAT = {"messages": [user("What is 2 + 2?"), bot("4")]}
PC = {"prompt": "2 + 2 =", "completion": " 4"}
ALPACA = {"instruction": "Add 2 and 2.", "input": "", "output": "4"}
PREF = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}


def check(
    lines: list[Any],
    method: Method = "sft",
    *,
    fmt: DatasetFormat = "auto",
    max_seq_length: int | None = None,
    counter: TokenCounter | None = None,
) -> tuple[list[dict[str, Any]], DatasetReport]:
    """Run the checks on JSONL made of ``lines`` (strings are written verbatim, anything else as JSON)."""
    data = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode()
    report = DatasetReport(source="mem.jsonl", method=method)
    examples = check_examples(
        parse_jsonl(data, report), report, fmt=fmt, max_seq_length=max_seq_length, token_counter=counter
    )
    return examples, report


def errors(report: DatasetReport) -> list[tuple[int | None, str]]:
    return [(issue.line, issue.message) for issue in report.errors()]


# ------------------------------------------------------------------------------- invalid records

INVALID: list[tuple[str, Method, list[Any], list[tuple[int | None, str]]]] = [
    (
        "invalid json",
        "sft",
        [CHAT, '{"messages": [', CHAT],
        [(2, "invalid JSON: Expecting value (column 15)")],
    ),
    ("not an object", "sft", [CHAT, "[1, 2]"], [(2, "expected a JSON object, got an array")]),
    ("a string", "sft", [CHAT, '"hello"'], [(2, "expected a JSON object, got a string")]),
    (
        "unknown role",
        "sft",
        [CHAT, {"messages": [user("Hi"), {"role": "bot", "content": "Hello"}]}],
        [(2, "messages[1].role is 'bot'; allowed roles: system, user, assistant")],
    ),
    (
        "missing role and content",
        "sft",
        [CHAT, {"messages": [{"content": "Hi"}, {"role": "assistant"}]}],
        [(2, "messages[0] has no 'role'"), (2, "messages[1] has no 'content'")],
    ),
    (
        "content not a string",
        "sft",
        [{"messages": [{"role": "user", "content": ["Hi"]}, bot("Hello")]}],
        [(1, "messages[0].content must be a string, got an array")],
    ),
    (
        "message not an object",
        "sft",
        [{"messages": ["Hi", bot("Hello")]}],
        [(1, "messages[0] must be an object with 'role' and 'content', got a string")],
    ),
    ("messages empty", "sft", [CHAT, {"messages": []}], [(2, "'messages' is empty")]),
    (
        "messages not a list",
        "sft",
        [CHAT, {"messages": "Hi"}],
        [(2, "'messages' must be a list of {role, content} messages, got a string")],
    ),
    (
        "no assistant turn",
        "sft",
        [CHAT, CHAT, {"messages": [system("Be brief."), user("Hi")]}],
        [(3, "'messages' has no assistant turn: nothing to learn from")],
    ),
    (
        "last turn not assistant",
        "sft",
        [{"messages": [user("Hi"), bot("Hello"), user("And?")]}],
        [(1, "the last turn of 'messages' is 'user'; the conversation must end with an assistant turn")],
    ),
    (
        "two user turns in a row",
        "sft",
        [CHAT, {"messages": [user("What is"), user("2 + 3?"), bot("5")]}],
        [(2, "messages[1] is a second 'user' turn in a row; turns must alternate user/assistant")],
    ),
    (
        "two assistant turns in a row",
        "sft",
        [{"messages": [system("s"), user("Hi"), bot("Hello"), bot("again")]}],
        [(1, "messages[3] is a second 'assistant' turn in a row; turns must alternate user/assistant")],
    ),
    (
        "system not first",
        "sft",
        [{"messages": [user("Hi"), bot("Hello"), system("Be brief.")]}],
        [(1, "messages[2] is a system message; only the first message may be one")],
    ),
    (
        "assistant first",
        "sft",
        [{"messages": [system("s"), bot("Hello"), user("Hi"), bot("Yes")]}],
        [(1, "messages[1] is 'assistant'; the first turn (after an optional system message) must be 'user'")],
    ),
    (
        "only a system message",
        "sft",
        [{"messages": [system("s")]}],
        [(1, "'messages' has only a system message")],
    ),
    (
        "whitespace-only content",
        "sft",
        [{"messages": [user("  \n\t"), bot("Hello")]}],
        [(1, "messages[0].content is empty")],
    ),
    (
        "blank lines keep their numbers",
        "sft",
        [CHAT, "", "   ", {"messages": [user("Hi")]}],
        [(4, "'messages' has no assistant turn: nothing to learn from")],
    ),
    (
        "mixed formats",
        "sft",
        [CHAT, PC, CHAT, ALPACA],
        [
            (
                2,
                "this record is in prompt_completion format but the file is messages "
                "(mixed formats in one file)",
            ),
            (4, "this record is in instruction format but the file is messages (mixed formats in one file)"),
        ],
    ),
    (
        "unknown keys",
        "sft",
        [CHAT, {"text": "hello", "label": 1}],
        [
            (
                2,
                "cannot tell the format (keys: label, text); expected 'messages', 'prompt'+'completion', "
                "'instruction'+'output', 'prompt'+'chosen'+'rejected'",
            )
        ],
    ),
    (
        "keys of two formats",
        "sft",
        [CHAT, {"messages": [user("a"), bot("b")], "completion": "c"}],
        [(2, "cannot tell the format (keys: completion, messages); expected")],
    ),
    (
        "prompt without completion",
        "sft",
        [PC, {"prompt": "3 + 3 ="}],
        [(2, "missing 'completion' for prompt_completion format")],
    ),
    (
        "empty completion",
        "sft",
        [PC, {"prompt": "3 + 3 =", "completion": " "}],
        [(2, "'completion' is empty")],
    ),
    (
        "prompt and completion of different kinds",
        "sft",
        [{"prompt": [user("Hi")], "completion": "Hello"}],
        [(1, "'prompt' and 'completion' must both be strings or both be lists of messages")],
    ),
    (
        "conversational prompt ending with the assistant",
        "sft",
        [{"prompt": [user("Hi"), bot("Hello")], "completion": [bot("Bye")]}],
        [(1, "'prompt' must end with a user turn; the reply goes in its own field")],
    ),
    (
        "completion of two messages",
        "sft",
        [{"prompt": [user("Hi")], "completion": [bot("Hello"), bot("again")]}],
        [(1, "'completion' must be one assistant message, got roles ['assistant', 'assistant']")],
    ),
    (
        "instruction without output",
        "sft",
        [ALPACA, {"instruction": "Add."}],
        [(2, "missing 'output' for instruction format")],
    ),
    ("empty instruction", "sft", [{"instruction": "", "output": "4"}], [(1, "'instruction' is empty")]),
    (
        "input not a string",
        "sft",
        [{"instruction": "Add.", "input": [1, 2], "output": "3"}],
        [(1, "'input' must be a string")],
    ),
    (
        "empty chosen",
        "dpo",
        [PREF, {"prompt": "Q", "chosen": "", "rejected": "B"}],
        [(2, "'chosen' is empty")],
    ),
    (
        "chosen by the user",
        "dpo",
        [{"prompt": [user("Q")], "chosen": [user("A")], "rejected": [bot("B")]}],
        [(1, "'chosen' must be one assistant message, got roles ['user']")],
    ),
    (
        "empty rejected lifted into a message",
        "dpo",
        [{"prompt": [user("Q")], "chosen": "A", "rejected": " "}],
        [(1, "rejected[0].content is empty")],
    ),
    (
        "no prompt with string replies",
        "dpo",
        [PREF, {"chosen": "A", "rejected": "B"}],
        [(2, "missing 'prompt' for preference format")],
    ),
    (
        "implicit prompt that differs",
        "dpo",
        [{"chosen": [user("Q1"), bot("A")], "rejected": [user("Q2"), bot("B")]}],
        [(1, "without 'prompt', 'chosen' and 'rejected' must be the same conversation up to their last")],
    ),
    (
        "prompt of the wrong type",
        "dpo",
        [{"prompt": 5, "chosen": "A", "rejected": "B"}],
        [(1, "'prompt' must be a string or a list of messages")],
    ),
    (
        "prompt opened by the assistant",
        "dpo",
        [{"prompt": [bot("Q")], "chosen": "A", "rejected": "B"}],
        [(1, "prompt[0] is 'assistant'; the first turn (after an optional system message) must be 'user'")],
    ),
    (
        "preference data for SFT",
        "sft",
        [PREF, PREF],
        [
            (
                None,
                "the data is in preference format ('prompt'+'chosen'+'rejected'), which SFT cannot train on; "
                "SFT needs messages ('messages') or prompt_completion ('prompt'+'completion') or instruction "
                "('instruction'+'output')",
            )
        ],
    ),
    (
        "prompt/completion for DPO",
        "dpo",
        [PC],
        [
            (
                None,
                "the data is in prompt_completion format ('prompt'+'completion'), which DPO cannot train on; "
                "DPO needs preference ('prompt'+'chosen'+'rejected')",
            )
        ],
    ),
]


@pytest.mark.parametrize(
    ("method", "lines", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_records(method: Method, lines: list[Any], expected: list[tuple[int | None, str]]) -> None:
    _, report = check(lines, method)
    found = errors(report)
    assert len(found) == len(expected), found
    for (line, message), (want_line, want) in zip(found, expected, strict=True):
        assert line == want_line
        assert message.startswith(want), message
    assert report.n_errors == len(expected)


def test_not_utf8_is_reported_with_its_line() -> None:
    report = DatasetReport(source="mem", method="sft")
    records = parse_jsonl(json.dumps(CHAT).encode() + b'\n{"x": "\xff"}\n', report)
    assert len(records) == 1
    assert errors(report) == [(2, "not UTF-8 text (byte 8)")]


def test_json_array_file_gets_one_error_with_the_fix() -> None:
    report = DatasetReport(source="mem", method="sft")
    records = parse_jsonl(b'[{"messages": []},\n {"messages": []}]\n', report)
    assert records == []
    assert errors(report) == [
        (
            1,
            "the file looks like a JSON array; JSONL needs one JSON object per line "
            "(convert with: jq -c '.[]' in.json > out.jsonl)",
        )
    ]


def test_byte_order_mark_and_crlf_are_accepted() -> None:
    report = DatasetReport(source="mem", method="sft")
    data = b"\xef\xbb\xbf" + json.dumps(CHAT).encode() + b"\r\n" + json.dumps(CHAT).encode() + b"\r\n"
    assert [n for n, _ in parse_jsonl(data, report)] == [1, 2]
    assert report.n_errors == 0


def test_every_error_is_collected_not_only_the_first() -> None:
    bad = {"messages": [user("Hi")]}
    _, report = check([bad] * 30 + [CHAT])
    assert report.n_errors == 30
    assert [line for line, _ in errors(report)] == list(range(1, 31))
    assert report.n_examples == 1


# ------------------------------------------------------------------------------- named formats


def test_named_format_refuses_records_of_another_format() -> None:
    _, report = check([CHAT, ALPACA], fmt="instruction")
    assert errors(report) == [
        (1, "this record is in messages format but the file is instruction (dataset.format is instruction)")
    ]


def test_named_format_reports_missing_keys() -> None:
    _, report = check([{"foo": 1}, PC], fmt="prompt_completion")
    assert errors(report) == [(1, "missing 'prompt', 'completion' for prompt_completion format")]


def test_named_format_invalid_for_the_method() -> None:
    _, report = check([CHAT], "dpo", fmt="messages")
    assert [line for line, _ in errors(report)] == [None]
    assert "DPO cannot train on" in errors(report)[0][1]


# ------------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (CHAT, "messages"),
        (PC, "prompt_completion"),
        (ALPACA, "instruction"),
        ({"instruction": "x", "output": "y"}, "instruction"),
        (PREF, "preference"),
        ({"chosen": [], "rejected": []}, "preference"),
        ({"prompt": "only a prompt"}, None),
        ({"text": "plain"}, None),
        ({"messages": [], "chosen": "x"}, None),
    ],
)
def test_detect_format(record: dict[str, Any], expected: str | None) -> None:
    assert detect_format(record) == expected


@pytest.mark.parametrize(
    ("lines", "method", "fmt"),
    [
        ([CHAT, CHAT], "sft", "messages"),
        ([PC, PC], "sft", "prompt_completion"),
        ([ALPACA], "sft", "instruction"),
        ([PREF], "dpo", "preference"),
    ],
)
def test_report_counts_the_detected_format(lines: list[Any], method: Method, fmt: str) -> None:
    _, report = check(lines, method)
    assert (report.format, report.format_counts, report.n_errors) == (fmt, {fmt: len(lines)}, 0)
    assert report.n_records == report.n_examples == len(lines)


def test_majority_format_wins_in_auto_mode() -> None:
    _, report = check([PC, CHAT, CHAT])
    assert report.format == "messages"
    assert report.format_counts == {"prompt_completion": 1, "messages": 2}
    assert [line for line, _ in errors(report)] == [1]


# ------------------------------------------------------------------------------- normalisation

NORMALISED: list[tuple[str, Method, dict[str, Any], dict[str, Any]]] = [
    (
        "messages: extra message keys dropped",
        "sft",
        {"messages": [system("s"), {**user("Hi"), "name": "ann"}, bot("Hello")]},
        {"messages": [system("s"), user("Hi"), bot("Hello")]},
    ),
    (
        "instruction with input",
        "sft",
        {"instruction": "Spell backwards. ", "input": " cat", "output": "tac"},
        {"messages": [user("Spell backwards.\n\ncat"), bot("tac")]},
    ),
    (
        "instruction without input",
        "sft",
        {"instruction": "Say hi.", "output": "Hi!"},
        {"messages": [user("Say hi."), bot("Hi!")]},
    ),
    ("instruction with empty input", "sft", ALPACA, {"messages": [user("Add 2 and 2."), bot("4")]}),
    ("prompt/completion strings kept", "sft", PC, PC),
    (
        "prompt/completion messages kept",
        "sft",
        {"prompt": [system("s"), user("Hi")], "completion": [bot("Hello")]},
        {"prompt": [system("s"), user("Hi")], "completion": [bot("Hello")]},
    ),
    ("preference strings kept", "dpo", PREF, PREF),
    (
        "preference messages kept",
        "dpo",
        {"prompt": [user("Q")], "chosen": [bot("A")], "rejected": [bot("B")]},
        {"prompt": [user("Q")], "chosen": [bot("A")], "rejected": [bot("B")]},
    ),
    (
        "preference string replies lifted to messages",
        "dpo",
        {"prompt": [user("Q")], "chosen": "A", "rejected": "B"},
        {"prompt": [user("Q")], "chosen": [bot("A")], "rejected": [bot("B")]},
    ),
    (
        "preference string prompt lifted to messages",
        "dpo",
        {"prompt": "Q", "chosen": [bot("A")], "rejected": [bot("B")]},
        {"prompt": [user("Q")], "chosen": [bot("A")], "rejected": [bot("B")]},
    ),
    (
        "preference implicit prompt extracted",
        "dpo",
        {
            "chosen": [system("s"), user("Q"), bot("x"), user("Q2"), bot("A")],
            "rejected": [system("s"), user("Q"), bot("x"), user("Q2"), bot("B")],
        },
        {
            "prompt": [system("s"), user("Q"), bot("x"), user("Q2")],
            "chosen": [bot("A")],
            "rejected": [bot("B")],
        },
    ),
]


@pytest.mark.parametrize(
    ("method", "record", "expected"), [c[1:] for c in NORMALISED], ids=[c[0] for c in NORMALISED]
)
def test_normalisation(method: Method, record: dict[str, Any], expected: dict[str, Any]) -> None:
    examples, report = check([record], method)
    assert report.n_errors == 0, report.errors()
    assert examples == [expected]


# ------------------------------------------------------------------------------- warnings


def test_duplicates_are_warnings_not_errors() -> None:
    examples, report = check([CHAT, {"messages": [user("a"), bot("b")]}, CHAT, CHAT])
    assert report.n_errors == 0
    assert [(w.line, w.message) for w in report.warnings()] == [
        (3, "duplicate of line 1"),
        (4, "duplicate of line 1"),
    ]
    assert len(examples) == 4


def test_identical_chosen_and_rejected_is_a_warning() -> None:
    examples, report = check([{"prompt": "Q", "chosen": "A", "rejected": "A"}], "dpo")
    assert (report.n_errors, len(examples)) == (0, 1)
    assert [(w.line, w.message) for w in report.warnings()] == [
        (1, "'chosen' and 'rejected' are identical: no preference to learn")
    ]


def test_ignored_keys_are_one_warning() -> None:
    _, report = check([{**CHAT, "id": 1}, {"messages": [user("x"), bot("y")], "id": 2, "source": "web"}])
    assert [(w.line, w.message) for w in report.warnings()] == [
        (None, "keys not used for training were ignored: 'id' (2x), 'source' (1x)")
    ]


# ------------------------------------------------------------------------------- lengths


def test_overlong_examples_are_errors_with_an_estimate() -> None:
    long = {"messages": [user("x" * 400), bot("y")]}
    _, report = check([CHAT, long], max_seq_length=64)
    assert errors(report) == [
        (
            2,
            "about 109 tokens (estimated as characters/4; pass a tokenizer for exact counts), longer than "
            "maxSeqLength 64: raise dataset.maxSeqLength or shorten this example",
        )
    ]
    assert report.token_stats is not None and report.token_stats.estimated


def test_token_counter_sees_every_sequence_the_trainer_builds() -> None:
    seen: list[Text] = []

    def counter(text: Text) -> int:
        seen.append(text)
        return 100 if "long" in json.dumps(text) else 10

    lines = [
        {"prompt": [user("Q")], "chosen": [bot("A")], "rejected": [bot("B")]},
        {"prompt": [user("Q2")], "chosen": [bot("A")], "rejected": [bot("long")]},
    ]
    examples, report = check(lines, "dpo", max_seq_length=50, counter=counter)
    assert seen[:2] == [[user("Q"), bot("A")], [user("Q"), bot("B")]]
    assert errors(report) == [
        (2, "100 tokens, longer than maxSeqLength 50: raise dataset.maxSeqLength or shorten this example")
    ]
    assert len(examples) == 1
    assert report.token_stats is not None and not report.token_stats.estimated


def test_prompt_completion_is_counted_as_one_sequence() -> None:
    seen: list[Text] = []

    def counter(text: Text) -> int:
        seen.append(text)
        return 3

    check([PC], counter=counter)
    assert seen == ["2 + 2 = 4"]


def test_a_counter_that_raises_is_reported_against_the_line() -> None:
    def counter(text: Text) -> int:
        raise ValueError("roles must alternate")

    _, report = check([CHAT], counter=counter)
    assert errors(report) == [
        (1, "the tokenizer or chat template refused this example: ValueError: roles must alternate")
    ]


def test_token_stats() -> None:
    lines = [{"prompt": "x" * (4 * n), "completion": ""} for n in range(1, 21)]
    lines = [{"prompt": line["prompt"][:-1], "completion": "y"} for line in lines]
    _, report = check(lines)
    stats = report.token_stats
    assert stats is not None
    assert (stats.min, stats.mean, stats.p95, stats.max, stats.estimated) == (1, 10.5, 19, 20, True)


def test_estimate_tokens() -> None:
    assert estimate_tokens("abcdefgh") == 2
    assert estimate_tokens("abcdefghi") == 3
    assert estimate_tokens([user("abcd"), bot("ab")]) == (1 + 4) + (1 + 4)


# ------------------------------------------------------------------------------- split


def test_split_is_deterministic_and_disjoint() -> None:
    examples = [{"i": i} for i in range(50)]
    train, held = split_examples(examples, 0.1, seed=42)
    assert (len(train), len(held)) == (45, 5)
    assert split_examples(examples, 0.1, seed=42) == (train, held)
    assert split_examples(examples, 0.1, seed=7)[1] != held
    assert sorted(e["i"] for e in train + held) == list(range(50))
    assert [e["i"] for e in train] == sorted(e["i"] for e in train)  # training order is kept


def test_split_holds_out_at_least_one() -> None:
    assert [len(part) for part in split_examples([{"i": 1}, {"i": 2}, {"i": 3}], 0.01, seed=0)] == [2, 1]
    assert split_examples([], 0.5, seed=0) == ([], [])


# ------------------------------------------------------------------------------- messages


def test_error_message_lists_twenty_issues_and_what_to_do() -> None:
    bad = {"messages": [user("Hi"), user("again"), bot("x")]}
    _, report = check([bad] * 25 + [PREF])
    text = str(DataValidationError(report))
    lines = text.splitlines()
    assert lines[0] == "dataset mem.jsonl failed validation for sft: 26 errors, 0 warnings"
    assert (
        lines[1]
        == "  line 1: messages[1] is a second 'user' turn in a row; turns must alternate user/assistant"
    )
    assert (
        lines[20]
        == "  line 20: messages[1] is a second 'user' turn in a row; turns must alternate user/assistant"
    )
    assert lines[21] == "  ... and 6 more"
    assert lines[22].startswith(
        "Fix the listed lines (numbered from 1, blank lines included) and check again with "
        "`python -m finetune_trainer validate <file> --method sft`"
    )
    assert len(lines) == 23


def test_error_message_puts_file_level_errors_first() -> None:
    _, report = check(["{", PC, PC], "dpo")
    lines = str(DataValidationError(report)).splitlines()
    assert lines[1].startswith("  the data is in prompt_completion format")
    assert lines[2] == "  line 1: invalid JSON: Expecting property name enclosed in double quotes (column 2)"


def test_error_message_covers_the_eval_file() -> None:
    _, report = check([CHAT])
    _, report.eval = check([{"messages": [user("Hi")]}])
    report.eval.source = "eval.jsonl"
    assert not report.ok
    text = str(DataValidationError(report))
    assert (
        "dataset eval.jsonl failed validation for sft: 1 error, 0 warnings\n  line 1: 'messages' has no"
        in text
    )
    assert "mem.jsonl" not in text  # the train file had no errors


def test_summary_and_json() -> None:
    _, report = check([CHAT, CHAT, {"messages": [user("Hi")]}])
    report.sha256 = "ab" * 32
    text = summarize(report)
    assert "train: mem.jsonl [INVALID]" in text
    assert "method sft, format messages, 2 valid of 3 records, 1 error, 1 warning" in text
    assert "(estimated as characters/4)" in text
    assert "  error: line 3: 'messages' has no assistant turn" in text
    assert "  warning: line 2: duplicate of line 1" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False
    assert (data["n_errors"], data["n_warnings"], data["n_examples"]) == (1, 1, 2)
    assert data["issues"][0] == {
        "severity": "warning",
        "message": "duplicate of line 1",
        "line": 2,
        "unit": "line",
    }
    assert data["token_stats"]["estimated"] is True
    assert data["eval"] is None


def test_issue_list_is_capped_but_counts_stay_exact() -> None:
    _, report = check(["{"] * 1100)
    assert (report.n_errors, len(report.issues)) == (1100, 1000)
    assert "  ... and 1080 more" in str(DataValidationError(report)).splitlines()
