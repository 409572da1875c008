"""Dataset validation and normalisation, pure: records in, TRL-ready examples and a report out.

Everything a bad dataset can do wrong is found here, before any GPU is allocated, and reported all at
once with line numbers, so one run of ``python -m finetune_trainer validate`` shows every line to fix.

Accepted formats (one per file) and what TRL 1.16 receives:

================  ==========================================  ==========================================
format            input keys                                  SFT / DPO example
================  ==========================================  ==========================================
messages          ``messages``: [{role, content}, ...]        ``{"messages": [...]}``
prompt_completion ``prompt``, ``completion`` (both strings    unchanged (TRL trains on the completion
                  or both message lists)                      only)
instruction       ``instruction``, ``input`` (optional),      ``{"messages": [user, assistant]}``
                  ``output`` (alpaca)
preference        ``prompt`` (string or messages, or left     ``{"prompt", "chosen", "rejected"}``, all
                  out when ``chosen``/``rejected`` are whole  strings or all message lists
                  conversations), ``chosen``, ``rejected``
================  ==========================================  ==========================================

SFT takes the first three, DPO only ``preference``. This module imports nothing heavy (no torch, no
datasets), so the CLI can validate a file anywhere.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from finetune_trainer.runconfig import DatasetFormat

Format = Literal["messages", "prompt_completion", "instruction", "preference"]
Method = Literal["sft", "dpo"]
Message = dict[str, str]
Text = str | list[Message]
TokenCounter = Callable[[Text], int]
"""Counts the tokens of a string or of a list of messages (rendered with the chat template)."""

FORMATS: tuple[Format, ...] = get_args(Format)
METHOD_FORMATS: dict[Method, tuple[Format, ...]] = {
    "sft": ("messages", "prompt_completion", "instruction"),
    "dpo": ("preference",),
}
ROLES = ("system", "user", "assistant")
MAX_STORED_ISSUES = 1000  # counts stay exact beyond this; only the list is capped
_KEYS: dict[Format, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "instruction": ("instruction", "input", "output"),
    "preference": ("prompt", "chosen", "rejected"),
}
# Keys that only one format has: a record's format is the one whose signature keys it carries.
_SIGNATURES: dict[Format, frozenset[str]] = {
    "messages": frozenset({"messages"}),
    "prompt_completion": frozenset({"completion"}),
    "instruction": frozenset({"instruction", "input", "output"}),
    "preference": frozenset({"chosen", "rejected"}),
}
_DESCRIBE: dict[Format, str] = {
    "messages": "'messages'",
    "prompt_completion": "'prompt'+'completion'",
    "instruction": "'instruction'+'output'",
    "preference": "'prompt'+'chosen'+'rejected'",
}
_EXPECTED = ", ".join(_DESCRIBE.values())


@dataclass(frozen=True)
class Issue:
    severity: Literal["error", "warning"]
    message: str
    line: int | None = None  # 1-based; None for file-level issues
    unit: str = "line"  # "line" for JSONL, "row" for Hub datasets

    def __str__(self) -> str:
        return f"{self.unit} {self.line}: {self.message}" if self.line is not None else self.message


@dataclass(frozen=True)
class TokenStats:
    min: int
    mean: float
    p95: int
    max: int
    estimated: bool  # True: characters/4, no tokenizer was given


@dataclass
class DatasetReport:
    """What validation found in one file (``eval`` holds the separate eval file's report, if any)."""

    source: str
    method: Method
    format: Format | None = None
    format_counts: dict[str, int] = field(default_factory=dict)
    n_records: int = 0  # non-blank lines / rows read
    n_examples: int = 0  # records that passed every check
    n_train: int = 0
    n_eval: int = 0
    n_errors: int = 0
    n_warnings: int = 0
    issues: list[Issue] = field(default_factory=list)
    token_stats: TokenStats | None = None
    sha256: str = ""
    eval: DatasetReport | None = None

    @property
    def ok(self) -> bool:
        return self.n_errors == 0 and (self.eval is None or self.eval.ok)

    def add(
        self, severity: Literal["error", "warning"], message: str, line: int | None = None, unit: str = "line"
    ) -> None:
        if severity == "error":
            self.n_errors += 1
        else:
            self.n_warnings += 1
        if len(self.issues) < MAX_STORED_ISSUES:
            self.issues.append(Issue(severity, message, line, unit))

    def errors(self) -> list[Issue]:
        """Stored errors, file-level ones first, then by line."""
        return _by_line(i for i in self.issues if i.severity == "error")

    def warnings(self) -> list[Issue]:
        return _by_line(i for i in self.issues if i.severity == "warning")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        data["eval"] = self.eval.to_dict() if self.eval is not None else None
        return data


class DataValidationError(Exception):
    """The dataset has errors; ``str()`` lists them with line numbers and says what to do."""

    def __init__(self, report: DatasetReport) -> None:
        super().__init__(format_errors(report))
        self.report = report


def _by_line(issues: Iterable[Issue]) -> list[Issue]:
    return sorted(issues, key=lambda i: (i.line is not None, i.line or 0))


def format_errors(report: DatasetReport, limit: int = 20) -> str:
    """A readable multi-line message: up to ``limit`` errors per file, then what to do."""
    lines: list[str] = []
    for rep in (report, report.eval):
        if rep is None or rep.n_errors == 0:
            continue
        lines.append(
            f"dataset {rep.source} failed validation for {rep.method}: "
            f"{_plural(rep.n_errors, 'error')}, {_plural(rep.n_warnings, 'warning')}"
        )
        shown = rep.errors()[:limit]
        lines += [f"  {issue}" for issue in shown]
        if rep.n_errors > len(shown):
            lines.append(f"  ... and {rep.n_errors - len(shown)} more")
    lines.append(advice(report.method))
    return "\n".join(lines)


def advice(method: Method) -> str:
    """What to do about a failed validation."""
    return (
        "Fix the listed lines (numbered from 1, blank lines included) and check again with "
        f"`python -m finetune_trainer validate <file> --method {method}`. Accepted formats: {_EXPECTED}."
    )


def summarize(report: DatasetReport) -> str:
    """A short human summary: counts, format, split, token lengths, then issues (errors first)."""
    out: list[str] = []
    for rep, name in ((report, "train"), (report.eval, "eval")):
        if rep is None:
            continue
        status = "OK" if rep.n_errors == 0 else "INVALID"
        out.append(f"{name}: {rep.source} [{status}]")
        out.append(
            f"  method {rep.method}, format {rep.format or 'unknown'}, "
            f"{rep.n_examples} valid of {rep.n_records} records, "
            f"{_plural(rep.n_errors, 'error')}, {_plural(rep.n_warnings, 'warning')}"
        )
        if rep is report and (report.n_eval or report.eval is not None):
            out.append(f"  split: {report.n_train} train / {report.n_eval} eval")
        if rep.token_stats is not None:
            t = rep.token_stats
            how = " (estimated as characters/4)" if t.estimated else ""
            out.append(f"  tokens per example: min {t.min}, mean {t.mean:.1f}, p95 {t.p95}, max {t.max}{how}")
        out.append(f"  sha256 {rep.sha256}")
        for issue in (rep.errors() + rep.warnings())[:20]:
            out.append(f"  {issue.severity}: {issue}")
        hidden = rep.n_errors + rep.n_warnings - min(20, len(rep.issues))
        if hidden > 0:
            out.append(f"  ... and {hidden} more")
    return "\n".join(out)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# ------------------------------------------------------------------------------------------ parsing


def parse_jsonl(data: bytes, report: DatasetReport) -> list[tuple[int, Any]]:
    """Decode JSONL into ``(line_number, value)`` pairs; blank lines are skipped, bad lines reported."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # UTF-8 byte order mark
    records: list[tuple[int, Any]] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            report.add("error", f"not UTF-8 text (byte {exc.start + 1})", number)
            continue
        try:
            records.append((number, json.loads(text)))
        except json.JSONDecodeError as exc:
            if number == 1 and text.lstrip().startswith("["):
                report.add(
                    "error",
                    "the file looks like a JSON array; JSONL needs one JSON object per line "
                    "(convert with: jq -c '.[]' in.json > out.jsonl)",
                    number,
                )
                return []
            report.add("error", f"invalid JSON: {exc.msg} (column {exc.colno})", number)
    return records


# ------------------------------------------------------------------------------------------ checks


def detect_format(record: dict[str, Any]) -> Format | None:
    """The format whose signature keys the record carries; None when it has none or several."""
    found = [fmt for fmt, keys in _SIGNATURES.items() if keys & record.keys()]
    return found[0] if len(found) == 1 else None


def check_examples(
    records: Iterable[tuple[int, Any]],
    report: DatasetReport,
    *,
    fmt: DatasetFormat = "auto",
    max_seq_length: int | None = None,
    token_counter: TokenCounter | None = None,
    unit: str = "line",
) -> list[dict[str, Any]]:
    """Check every record, fill ``report`` and return the valid examples normalised for TRL."""
    objects: list[tuple[int, dict[str, Any], Format | None]] = []
    for number, value in records:
        report.n_records += 1
        if isinstance(value, dict):
            objects.append((number, value, detect_format(value)))
        else:
            report.add("error", f"expected a JSON object, got {_json_type(value)}", number, unit)
    counts = Counter(f for _, _, f in objects if f is not None)
    report.format_counts = {str(f): n for f, n in counts.items()}
    report.format = fmt if fmt != "auto" else (counts.most_common(1)[0][0] if counts else None)
    allowed = METHOD_FORMATS[report.method]
    if report.format is not None and report.format not in allowed:
        method = report.method.upper()
        report.add(
            "error",
            f"the data is in {report.format} format ({_DESCRIBE[report.format]}), which {method} cannot "
            f"train on; {method} needs " + " or ".join(f"{f} ({_DESCRIBE[f]})" for f in allowed),
        )
        return []
    checker = _Checker(report, fmt, max_seq_length, token_counter, unit)
    examples = [e for number, obj, detected in objects if (e := checker.check(number, obj, detected))]
    if checker.ignored:
        listed = ", ".join(f"{k!r} ({n}x)" for k, n in sorted(checker.ignored.items()))
        report.add("warning", f"keys not used for training were ignored: {listed}")
    report.n_examples = len(examples)
    report.token_stats = _stats(checker.lengths, estimated=token_counter is None)
    return examples


@dataclass
class _Checker:
    """Checks records one by one against the file's format, remembering what spans records."""

    report: DatasetReport
    fmt: DatasetFormat
    max_seq_length: int | None
    token_counter: TokenCounter | None
    unit: str
    lengths: list[int] = field(default_factory=list)  # over-long examples too: the maximum says what fits
    seen: dict[str, int] = field(default_factory=dict)
    ignored: Counter[str] = field(default_factory=Counter)

    def error(self, message: str, number: int) -> None:
        self.report.add("error", message, number, self.unit)

    def check(self, number: int, obj: dict[str, Any], detected: Format | None) -> dict[str, Any] | None:
        file_format = self.report.format
        if detected is not None and detected != file_format:
            why = "mixed formats in one file" if self.fmt == "auto" else f"dataset.format is {self.fmt}"
            self.error(f"this record is in {detected} format but the file is {file_format} ({why})", number)
            return None
        # A record with only a prompt is checked against the file's format ("missing 'completion'").
        if file_format is None or (detected is None and self.fmt == "auto" and "prompt" not in obj):
            present = ", ".join(sorted(obj)) or "none"
            self.error(f"cannot tell the format (keys: {present}); expected {_EXPECTED}", number)
            return None
        problems, example = _check_record(file_format, obj)
        for problem in problems:
            self.error(problem, number)
        if example is None:
            return None
        self.ignored.update(k for k in obj if k not in _KEYS[file_format])
        if not self._fits(example, number):
            return None
        key = json.dumps(example, sort_keys=True, ensure_ascii=False)
        if key in self.seen:
            self.report.add("warning", f"duplicate of {self.unit} {self.seen[key]}", number, self.unit)
        self.seen.setdefault(key, number)
        if "chosen" in example and example["chosen"] == example["rejected"]:
            self.report.add(
                "warning", "'chosen' and 'rejected' are identical: no preference to learn", number, self.unit
            )
        return example

    def _fits(self, example: dict[str, Any], number: int) -> bool:
        count = self.token_counter or estimate_tokens
        try:
            length = max(count(text) for text in sequences(example))
        except Exception as exc:  # a chat template may raise on anything; report it against the line
            self.error(
                f"the tokenizer or chat template refused this example: {type(exc).__name__}: {exc}", number
            )
            return False
        self.lengths.append(length)
        if self.max_seq_length is None or length <= self.max_seq_length:
            return True
        how = "" if self.token_counter else " (estimated as characters/4; pass a tokenizer for exact counts)"
        self.error(
            f"{'' if self.token_counter else 'about '}{length} tokens{how}, longer than maxSeqLength "
            f"{self.max_seq_length}: raise dataset.maxSeqLength or shorten this example",
            number,
        )
        return False


def _check_record(fmt: Format, obj: dict[str, Any]) -> tuple[list[str], dict[str, Any] | None]:
    """Problems of one record in format ``fmt``, and its normalised example when there are none."""
    missing = [k for k in _KEYS[fmt] if k not in obj and not _optional(fmt, k, obj)]
    if missing:
        return [f"missing {', '.join(repr(k) for k in missing)} for {fmt} format"], None
    if fmt == "messages":
        problems = _messages_problems(obj["messages"], "messages", "conversation")
        return problems, None if problems else {"messages": _clean(obj["messages"])}
    if fmt == "instruction":
        problems = [p for k in ("instruction", "output") if (p := _text_problem(obj[k], k))]
        if obj.get("input") is not None and not isinstance(obj["input"], str):
            problems.append("'input' must be a string")
        if problems:
            return problems, None
        prompt = obj["instruction"].strip()
        if (obj.get("input") or "").strip():
            prompt += "\n\n" + obj["input"].strip()
        return [], {
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj["output"]}]
        }
    if fmt == "prompt_completion":
        return _pair(obj, "completion")
    return _preference(obj)


def _optional(fmt: Format, key: str, obj: dict[str, Any]) -> bool:
    if fmt == "instruction":
        return key == "input"
    # A preference record may leave the prompt inside whole chosen/rejected conversations.
    return fmt == "preference" and key == "prompt" and isinstance(obj.get("chosen"), list)


def _pair(obj: dict[str, Any], reply_key: str) -> tuple[list[str], dict[str, Any] | None]:
    prompt, reply = obj["prompt"], obj[reply_key]
    if isinstance(prompt, str) and isinstance(reply, str):
        problems = [p for k in ("prompt", reply_key) if (p := _text_problem(obj[k], k))]
        return problems, None if problems else {"prompt": prompt, reply_key: reply}
    if isinstance(prompt, list) and isinstance(reply, list):
        problems = _messages_problems(prompt, "prompt", "prompt") + _messages_problems(
            reply, reply_key, "reply"
        )
        return problems, None if problems else {"prompt": _clean(prompt), reply_key: _clean(reply)}
    return [f"'prompt' and '{reply_key}' must both be strings or both be lists of messages"], None


def _preference(obj: dict[str, Any]) -> tuple[list[str], dict[str, Any] | None]:
    prompt, chosen, rejected = obj.get("prompt"), obj["chosen"], obj["rejected"]
    if "prompt" not in obj:  # implicit prompt: the shared start of two whole conversations
        problems = [p for k in ("chosen", "rejected") for p in _messages_problems(obj[k], k, "conversation")]
        if problems:
            return problems, None
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0 or len(chosen) - shared != 1 or len(rejected) - shared != 1:
            return [
                "without 'prompt', 'chosen' and 'rejected' must be the same conversation up to "
                "their last (assistant) message"
            ], None
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if not isinstance(prompt, (str, list)):
        return ["'prompt' must be a string or a list of messages"], None
    if any(isinstance(v, list) for v in (prompt, chosen, rejected)):
        # TRL reads all three in one form: strings are lifted into messages.
        if isinstance(prompt, str):
            if problem := _text_problem(prompt, "prompt"):
                return [problem], None
            prompt = [{"role": "user", "content": prompt}]
        chosen, rejected = (_as_reply(r) for r in (chosen, rejected))
    problems, with_chosen = _pair({"prompt": prompt, "chosen": chosen}, "chosen")
    more, with_rejected = _pair({"prompt": prompt, "rejected": rejected}, "rejected")
    problems = list(dict.fromkeys(problems + more))  # a bad prompt is reported once
    if problems or with_chosen is None or with_rejected is None:
        return problems, None
    return [], {**with_chosen, "rejected": with_rejected["rejected"]}


def _as_reply(value: Any) -> Any:
    return [{"role": "assistant", "content": value}] if isinstance(value, str) else value


def _text_problem(value: Any, key: str) -> str | None:
    label = key if "[" in key else f"'{key}'"  # messages[0].content reads better unquoted
    if not isinstance(value, str):
        return f"{label} must be a string, got {_json_type(value)}"
    if not value.strip():
        return f"{label} is empty"
    return None


def _messages_problems(value: Any, key: str, kind: Literal["conversation", "prompt", "reply"]) -> list[str]:
    """Problems of a message list. ``conversation``: a whole SFT chat ending with the assistant;
    ``prompt``: what comes before a reply (ends with the user); ``reply``: one assistant message."""
    if not isinstance(value, list):
        return [f"'{key}' must be a list of {{role, content}} messages, got {_json_type(value)}"]
    if not value:
        return [f"'{key}' is empty"]
    problems: list[str] = []
    for i, message in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(message, dict):
            problems.append(f"{where} must be an object with 'role' and 'content', got {_json_type(message)}")
            continue
        role = message.get("role")
        if "role" not in message:
            problems.append(f"{where} has no 'role'")
        elif role not in ROLES:
            problems.append(f"{where}.role is {role!r}; allowed roles: {', '.join(ROLES)}")
        if "content" not in message:
            problems.append(f"{where} has no 'content'")
        elif problem := _text_problem(message["content"], f"{where}.content"):
            problems.append(problem)
    if problems:
        return problems  # the order of roles means nothing until every role is known
    return _order_problems([m["role"] for m in value], key, kind)


def _order_problems(
    roles: list[str], key: str, kind: Literal["conversation", "prompt", "reply"]
) -> list[str]:
    if kind == "reply":
        if roles != ["assistant"]:
            return [f"'{key}' must be one assistant message, got roles {roles}"]
        return []
    for i, role in enumerate(roles[1:], start=1):
        if role == "system":
            return [f"{key}[{i}] is a system message; only the first message may be one"]
    start = 1 if roles[0] == "system" else 0
    turns = roles[start:]
    if not turns:
        return [f"'{key}' has only a system message"]
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            if i == 0:
                return [
                    f"{key}[{start}] is {role!r}; the first turn (after an optional system message) "
                    "must be 'user'"
                ]
            return [
                f"{key}[{start + i}] is a second {role!r} turn in a row; turns must alternate user/assistant"
            ]
    if kind == "prompt" and turns[-1] != "user":
        return [f"'{key}' must end with a user turn; the reply goes in its own field"]
    if kind == "conversation":
        if "assistant" not in turns:
            return [f"'{key}' has no assistant turn: nothing to learn from"]
        if turns[-1] != "assistant":
            return [
                f"the last turn of '{key}' is {turns[-1]!r}; the conversation must end with an assistant turn"
            ]
    return []


def _clean(messages: list[dict[str, Any]]) -> list[Message]:
    """Only role and content go to TRL (extra message keys are dropped: one schema per column)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def sequences(example: dict[str, Any]) -> list[Text]:
    """The full sequences the trainer tokenises for one normalised example (two for DPO)."""
    if "messages" in example:
        return [example["messages"]]
    replies = [example[k] for k in ("completion", "chosen", "rejected") if k in example]
    return [example["prompt"] + reply for reply in replies]


def estimate_tokens(text: Text) -> int:
    """About four characters per token, plus a few tokens of chat template per message."""
    if isinstance(text, str):
        return math.ceil(len(text) / 4)
    return sum(math.ceil(len(m["content"]) / 4) + 4 for m in text)


def _stats(lengths: list[int], *, estimated: bool) -> TokenStats | None:
    if not lengths:
        return None
    ordered = sorted(lengths)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    return TokenStats(ordered[0], sum(ordered) / len(ordered), p95, ordered[-1], estimated)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number")
