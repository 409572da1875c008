"""Bad input: invalid manifests, invalid datasets, fuzzed specs and garbage progress reports.

- The catalogue of invalid manifests (tests/integration/invalid_manifests.py: wrong types, bounds,
  enums, formats, unknown fields, missing fields, cross-field rules, huge strings and lists, and
  training fields changed after the operator itself started the job) is sent through the Python
  client with strict field validation while the operator runs: each is refused naming its field,
  nothing is created or changed, and the operator notices nothing.
- A catalogue of broken dataset lines is refused by the trainer's validator, each with its line.
- Seeded random mutations of valid specs go to the API server: a refusal must be a 4xx naming a
  spec field; an accepted spec must be reconciled (a phase) without the operator logging an error
  or restarting.
- Garbage in the progress ConfigMap (which the trainer's token may write) must not wedge the job.

Short form: 150 fuzzed specs; ``make soak``: 1000.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from finetune_operator import api
from finetune_operator import constants as c
from finetune_trainer.runconfig import PROGRESS_KEY, ExitCode
from tests.fixtures.operator import OperatorProcess
from tests.integration.invalid_manifests import CASES, Invalid, base_manifest
from tests.integration.test_operator_lifecycle import World, now, write_progress
from tests.support import faults
from tests.support.builders import make_job
from tests.support.waiting import wait_for

FUZZED = faults.scale(150, 1000)
pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.timeout(faults.scale(600, 1800))]


def refusal(err: ApiException) -> str:
    """The API server's message and the fields of its causes, one text to search."""
    body = json.loads(err.body or "{}")
    causes = (body.get("details") or {}).get("causes") or []
    return "\n".join(
        [str(body.get("message", "")), *(f"{c.get('field')}: {c.get('message')}" for c in causes)]
    )


def category(case: Invalid) -> str:
    """Which kind of mistake a catalogue entry is (for the figures)."""
    if case.after_start:
        return "immutable after start"
    kinds = {
        "must be of type": "wrong type",
        "than": "out of bounds",
        "upported value": "enum",
        "should match": "format",
        "unknown field": "unknown field",
        "Required value": "missing field",
        "Too long": "huge string/list",
        "Too many": "huge string/list",
        "quantity": "format",
    }
    return next((kind for fragment, kind in kinds.items() if fragment in case.message), "cross-field rule")


def test_invalid_manifest_catalogue_is_refused_with_the_field(
    kube_api: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    custom = client.CustomObjectsApi(kube_api)
    world = World(kube_api, namespace)
    started = [case for case in CASES if case.after_start]
    for case in started:  # the operator itself starts them: that is what makes the spec immutable
        manifest = base_manifest(f"bad-{case.name}")
        custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, manifest)
    for case in started:
        wait_for(f"{case.name} started", lambda n=f"bad-{case.name}": world.status(n).get("attempt"), 60)
    wrong = []
    for case in CASES:
        name = f"bad-{case.name}"
        manifest = case.manifest(name)
        before = world.ftj(name)
        try:
            if before is None:
                custom.create_namespaced_custom_object(
                    api.GROUP, api.VERSION, namespace, api.PLURAL, manifest, field_validation="Strict"
                )
            else:
                manifest["metadata"]["resourceVersion"] = before["metadata"]["resourceVersion"]
                custom.replace_namespaced_custom_object(
                    api.GROUP, api.VERSION, namespace, api.PLURAL, name, manifest, field_validation="Strict"
                )
        except ApiException as err:
            text = refusal(err)
            if err.status not in (400, 422) or case.field not in text or case.message not in text:
                wrong.append(f"{case.name}: {err.status} {text}")
        else:
            wrong.append(f"{case.name}: accepted")
        after = world.ftj(name)
        if (after or {}).get("spec") != (before or {}).get("spec"):
            wrong.append(f"{case.name}: the stored object changed")
    assert not wrong, "\n".join(wrong)
    assert operator.starts == 1 and operator.errors() == []
    faults.record(
        "bad-input-manifests",
        invalid_manifests=len(CASES),
        by_category=dict(Counter(category(case) for case in CASES)),
        refused_with_field=len(CASES),
        accepted=0,
    )


# ------------------------------------------------------------------------------------------ datasets

GOOD = {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}
GOOD_PAIR = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}


def _chat(*turns: tuple[Any, Any]) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


SFT_DEFECTS: list[tuple[bytes | dict[str, Any] | list[Any], str]] = [
    (b'{"messages": [', "invalid JSON"),
    (["not", "an", "object"], "expected a JSON object, got"),
    ({"text": "hello"}, "cannot tell the format"),
    ({"messages": "hello"}, "'messages' must be a list"),
    ({"messages": []}, "'messages' is empty"),
    (_chat(("user", "Hi"), ("bot", "Hello")), "messages[1].role is 'bot'"),
    (_chat(("user", 42), ("assistant", "Hello")), "messages[0].content must be a string"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "messages[0] has no 'content'"),
    ({"messages": [{"content": "Hi"}, {"role": "assistant", "content": "x"}]}, "messages[0] has no 'role'"),
    ({"messages": ["Hi", {"role": "assistant", "content": "x"}]}, "messages[0] must be an object"),
    (_chat(("user", "Hi")), "has no assistant turn"),
    (_chat(("user", "Hi"), ("assistant", "Hello"), ("user", "And?")), "must end with an assistant turn"),
    (_chat(("user", "a"), ("user", "b"), ("assistant", "c")), "second 'user' turn in a row"),
    (_chat(("user", "Hi"), ("assistant", "Hey"), ("system", "Be brief.")), "only the first message"),
    (_chat(("assistant", "Hi"), ("user", "Hey")), "must be 'user'"),
    (_chat(("system", "Be brief.")), "has only a system message"),
    (_chat(("user", "   "), ("assistant", "Hello")), "messages[0].content is empty"),
    (b'{"messages": "\xff\xfe"}', "not UTF-8 text"),
    ({"prompt": "What is 2 + 2?", "completion": "4"}, "this record is in prompt_completion format"),
    (_chat(("user", "long " * 1000), ("assistant", "ok")), "longer than maxSeqLength"),
    (_chat(("user", "x" * 1_000_000), ("assistant", "ok")), "longer than maxSeqLength"),  # a 1 MB line
]
DPO_DEFECTS: list[tuple[bytes | dict[str, Any] | list[Any], str]] = [
    ({"prompt": "Q?", "chosen": "A."}, "missing 'rejected'"),
    ({"prompt": "Q?", "chosen": 5, "rejected": "B."}, "must both be strings or both be lists"),
    ({"prompt": 7, "chosen": "A.", "rejected": "B."}, "'prompt' must be a string or a list of messages"),
    ({"prompt": "Q?", "chosen": "", "rejected": "B."}, "'chosen' is empty"),
    (
        {"prompt": "Q?", "chosen": [{"role": "user", "content": "A."}], "rejected": "B."},
        "'chosen' must be one assistant message",
    ),
    (
        {
            "chosen": _chat(("user", "a"), ("assistant", "b"))["messages"],
            "rejected": _chat(("user", "x"), ("assistant", "y"))["messages"],
        },
        "must be the same conversation up to their last",
    ),
    (GOOD, "this record is in messages format"),
    (b"{'prompt': 'single quotes'}", "invalid JSON"),
]


def write_dataset(path: Path, good: dict[str, Any], defects: list[Any]) -> dict[int, str]:
    """Good lines with each defect in between; returns line number -> expected message fragment."""
    lines: list[bytes] = []
    expected: dict[int, str] = {}
    for defect, fragment in defects:
        lines.append(json.dumps(good).encode())
        lines.append(defect if isinstance(defect, bytes) else json.dumps(defect).encode())
        expected[len(lines)] = fragment
    lines.append(json.dumps(good).encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expected


@pytest.mark.parametrize(
    ("method", "good", "defects"),
    [("sft", GOOD, SFT_DEFECTS), ("dpo", GOOD_PAIR, DPO_DEFECTS)],
    ids=["sft", "dpo"],
)
def test_invalid_datasets_are_refused_with_line_numbers(
    tmp_path: Path, method: str, good: dict[str, Any], defects: list[Any]
) -> None:
    path = tmp_path / f"{method}.jsonl"
    expected = write_dataset(path, good, defects)
    validate = [sys.executable, "-m", "finetune_trainer", "validate", str(path), "--method", method]
    done = subprocess.run(
        [*validate, "--max-seq-length", "512", "--json"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == ExitCode.INVALID_DATA, done.stderr
    errors: dict[int, list[str]] = {}
    for issue in json.loads(done.stdout)["issues"]:
        if issue["severity"] == "error":
            errors.setdefault(issue["line"], []).append(issue["message"])
    missed = {n: f for n, f in expected.items() if not any(f in m for m in errors.get(n, []))}
    assert not missed, f"not reported on its line: {missed}\nreported: {errors}"
    assert set(errors) == set(expected), f"errors on valid lines: {set(errors) - set(expected)}"
    human = subprocess.run(
        [*validate, "--max-seq-length", "512"], capture_output=True, text=True, timeout=120
    )
    assert human.returncode == ExitCode.INVALID_DATA
    assert all(f"line {n}:" in human.stdout for n in sorted(expected)[:20]), human.stdout
    faults.record(
        f"bad-input-datasets-{method}", invalid_lines=len(expected), refused_with_line_number=len(expected)
    )


# ------------------------------------------------------------------------------------------ fuzzing

_INTS = (0, 1, -1, 2, 15, 16, 17, 63, 64, 100, 101, 512, 513, 4096, 2**31, 2**53 + 1, 2**63 - 1, -(2**63))
_FLOATS = (0.0, -0.0, 1e-300, 0.5, 0.9999, 1.0, 1.5, 1e9, 1e308, -1e308)
_STRINGS = (
    "", " ", "a", "A", "a" * 63, "a" * 64, "a" * 253, "a" * 254, "x" * 1025, "x" * 100_000,
    "ünïcödé 💥", "\x00", "\n", "../../etc/passwd", "$(HOME)", "${HOME}", "' OR 1=1 --", "<script>",
    "s3://", "s3://bkt", "s3://my-bucket/x/", "s3://my-bucket/" + "ä" * 500, "hf://org/name", "pvc://claim/p",
    "http://x", "https://s3.example.com", "nf4", "none", "sft", "dpo", "auto", "preference", "messages",
    "all-linear", "q_proj", "Exists", "Equal", "NoExecute", "cosine", "8", "500m", "64Gi", "-1Gi", "1e3",
    "nvidia.com/gpu", "team-a",
)  # fmt: skip


def junk(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.choice(
        ("none", "bool", "int", "float", "str", "str", "list", "dict") if depth < 3 else ("int", "str")
    )
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice(_INTS)
    if kind == "float":
        return rng.choice(_FLOATS)
    if kind == "str":
        return rng.choice(_STRINGS)
    if kind == "list":
        return [junk(rng, depth + 1) for _ in range(rng.choice((0, 1, 2, 65)))]
    return {
        rng.choice(("a", "uri", "nodes", "key", "rule")): junk(rng, depth + 1)
        for _ in range(rng.randint(0, 3))
    }


def plausible(rng: random.Random, value: Any) -> Any:
    """Another value of the same JSON type as ``value``: near it, or from the pools above."""
    near = rng.random() < 0.6
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice((value + 1, value - 1, value * 2, value * 16, 0)) if near else rng.choice(_INTS)
    if isinstance(value, float):
        return rng.choice((value / 2, value * 2, value + 1e-9)) if near else rng.choice(_FLOATS)
    if isinstance(value, str):
        edits = (
            value + "-x",
            value.upper(),
            value * 3,
            value[: len(value) // 2],
            value + "/sub/" + "k" * 200,
        )
        return rng.choice(edits) if near else rng.choice(_STRINGS)
    if isinstance(value, list):
        return [plausible(rng, v) for v in value] or [rng.choice(_STRINGS)]
    if isinstance(value, dict):
        return {k: plausible(rng, v) if rng.random() < 0.3 else v for k, v in value.items()}
    return junk(rng)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


def fuzz(rng: random.Random, index: int, namespace: str) -> dict[str, Any]:
    """A valid manifest with one or two random mutations: change, replace, delete or add a field."""
    name = f"fuzz-{index:04d}"
    manifest = base_manifest(name) if rng.random() < 0.5 else make_job(name, namespace).manifest()
    for _ in range(rng.randint(1, 2)):
        path = rng.choice([p for p in _paths(manifest["spec"], ("spec",)) if len(p) > 1])
        parent: Any = manifest
        for part in path[:-1]:
            parent = parent[part]
        op = rng.choice(("like", "like", "like", "like", "junk", "delete", "add"))
        if op == "like":  # same JSON type, other value: often still valid, so the operator sees it
            parent[path[-1]] = plausible(rng, parent[path[-1]])
        elif op == "junk":
            parent[path[-1]] = junk(rng)
        elif op == "delete" and isinstance(parent, dict):
            parent.pop(path[-1], None)
        elif isinstance(parent, dict):
            parent[rng.choice(("extra", "uri2", "Nodes", "spec"))] = junk(rng)
    return manifest


def test_fuzzed_specs_never_crash_the_operator(
    kube_api: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    rng, seed = faults.seeded("bad-input-fuzz")
    custom = client.CustomObjectsApi(kube_api)
    world = World(kube_api, namespace)
    assert operator.proc is not None
    pid = operator.proc.pid
    accepted: list[str] = []
    refused = 0
    wrong = []
    for index in range(FUZZED):
        manifest = fuzz(rng, index, namespace)
        try:
            custom.create_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, manifest, field_validation="Strict"
            )
        except ApiException as err:
            refused += 1
            text = refusal(err)
            if err.status not in (400, 422) or "spec" not in text:
                wrong.append(
                    f"fuzz-{index:04d} refused with {err.status}: {text[:500]}\n{json.dumps(manifest)[:2000]}"
                )
        else:
            accepted.append(manifest["metadata"]["name"])
    assert not wrong, "\n".join(wrong)

    def unreconciled() -> list[str]:
        response = custom.list_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, _preload_content=False
        )
        items = json.loads(response.data)["items"]
        return [i["metadata"]["name"] for i in items if not (i.get("status") or {}).get("phase")]

    wait_for("every accepted spec reconciled", lambda: not unreconciled(), faults.scale(120, 600))
    phases = Counter(world.status(name)["phase"] for name in accepted)
    assert operator.proc.pid == pid and operator.proc.poll() is None, "the operator died"
    assert operator.starts == 1
    assert operator.errors() == []
    faults.record(
        "bad-input-fuzz",
        seed=seed,
        fuzzed_specs=FUZZED,
        refused=refused,
        accepted=len(accepted),
        accepted_phases=dict(phases),
        operator_crashes=0,
        error_lines=0,
    )


def _report(**fields: Any) -> str:
    """A report of the current attempt (ATTEMPT is replaced when it is written) with ``fields``."""
    body = {"attempt": "ATTEMPT", "state": "training", "step": 3, "time": "2026-01-01T00:00:00Z", **fields}
    return json.dumps(body).replace('"ATTEMPT"', "ATTEMPT")


GARBAGE_PROGRESS: list[str] = [
    "not json",
    "[]",
    "null",
    '{"attempt": "one"}',
    _report(state="exploded"),
    _report(step=-5, totalSteps=10),
    _report(step=5, totalSteps=-10),
    _report(step=2**63),
    _report(trainLoss="NaN").replace('"NaN"', "NaN"),  # Python's json reads NaN and Infinity
    _report(trainLoss="Infinity").replace('"Infinity"', "Infinity"),
    _report(epoch=-1.0),
    _report(epoch="Infinity").replace('"Infinity"', "Infinity"),
    _report(etaSeconds=-100),
    _report(totalSteps=10, etaSeconds="NaN").replace('"NaN"', "NaN"),
    _report(totalSteps=10, etaSeconds=1e300),
    _report(time="yesterday"),
    _report(checkpoints=[{"step": -1, "uri": "s3://x/", "time": "2026-01-01T00:00:00Z"}]),
    _report(checkpoints=[{"step": i, "uri": "x" * 10_000, "time": "t"} for i in range(80)]),
    _report(attempt=99, state="finished", step=10**9),
    _report(message="m" * 200_000),
]


def test_garbage_progress_reports_never_wedge_a_job(
    kube_api: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    """The trainer's token may write anything into its progress ConfigMap, and a trainer may write a
    bad report and then crash: the operator must still restart the gang, and keep the status valid."""
    world = World(kube_api, namespace)
    world.create(make_job("g").gpus(0).max_restarts(0).manifest())
    trainer = client.CoreV1Api(_trainer(world, "g"))
    wedged = []
    attempt = 1
    for garbage in GARBAGE_PROGRESS:
        (pod,) = world.running_pods(c.attempt_name("g", attempt), 1)
        body = {"data": {PROGRESS_KEY: garbage.replace("ATTEMPT", str(attempt))}}
        trainer.patch_namespaced_config_map(
            c.progress_name("g"), namespace, body, _content_type="application/merge-patch+json"
        )
        world.kubelet.preempt(pod)  # the trainer's pod goes away with the garbage as its last word
        following = c.attempt_name("g", attempt + 1)
        try:
            # a restart takes about a second; 45 s leaves room for a loaded machine, and a job that
            # is wedged stays wedged (the same report fails every reconcile, timer included)
            wait_for("the next attempt", lambda j=following: j in world.jobs("g"), 45)
        except AssertionError:
            wedged.append(garbage[:120])
            good = {"attempt": attempt, "state": "training", "step": 1, "totalSteps": 100, "time": now()}
            write_progress(trainer, namespace, "g", good)  # a sane report unblocks it
            wait_for("the next attempt", lambda j=following: j in world.jobs("g"), 30)
        attempt += 1
    assert not wedged, (
        "the operator stopped acting on the job while its progress ConfigMap held:\n" + "\n".join(wedged)
    )
    status = wait_for(
        "the last restart in status", lambda: (s := world.status("g"))["attempt"] == attempt and s, 30
    )
    assert status["restarts"]["total"] == attempt - 1
    assert operator.errors() == [], operator.errors()[:3]
    faults.record("bad-input-progress", garbage_reports=len(GARBAGE_PROGRESS), wedged=len(wedged))


def _trainer(world: World, name: str) -> client.ApiClient:
    wait_for(
        "the trainer's ServiceAccount",
        lambda: any(sa.metadata.name == c.trainer_identity_name(name)
                    for sa in world.core.list_namespaced_service_account(world.ns).items),
        60,
    )  # fmt: skip
    return world.token_client(c.trainer_identity_name(name))
