"""Schemathesis fuzzes every /v1 route of our OpenAPI document against a live gateway.

Issue 10: at least 2,000 generated cases per run, bounded in time, through gunicorn + gevent
with a valid key and a priced, healthy model on the fake upstream, so requests really go
through the relay. Valid (positive) and invalid (negative) bodies alike must give no 5xx,
every error body in its route's shape, no traceback, and a log row for every request the
relay saw. The figures (cases, statuses, seconds, seed) are printed for the record.
"""
import collections
import os
import random
import time

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_schema_conformance, status_code_conformance,
)

MODEL = "gpt-4o-mini"  # healthy on the fake upstream: any 5xx is the gateway's own bug
EXAMPLES_PER_OPERATION = 80  # per route and generation mode: 14 x 2 x 80 = 2,240 cases
# Requests the relay sees write a log row (count_tokens is free and not logged).
LOGGED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
          "/v1/images/generations", "/v1/audio/speech", "/v1/audio/transcriptions",
          "/v1/audio/translations", "/v1/messages")
ARTIFACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts")
SCHEMA_CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance,
                 response_schema_conformance)


def pin_model(node):
    """Positive cases name the priced model (negative ones still try every other value)."""
    if isinstance(node, dict):
        properties = node.get("properties")
        if isinstance(properties, dict) and isinstance(properties.get("model"), dict):
            properties["model"] = dict(properties["model"], enum=[MODEL])
        for value in node.values():
            pin_model(value)
    elif isinstance(node, list):
        for value in node:
            pin_model(value)
    return node


def quick_to_generate(node):
    """The same schema, cheaper to draw from: Hypothesis spends most of its time inventing
    arbitrary JSON for open objects and long arrays. Closed objects (negative cases still add
    unknown fields), arrays of at most 3 items, free strings of at most 40 characters."""
    if isinstance(node, dict):
        if node.get("additionalProperties") is True:
            node["additionalProperties"] = False
        if node.get("type") == "array":
            node.setdefault("maxItems", 3)
        if node.get("type") == "string" and not {"enum", "format"} & set(node):
            node.setdefault("maxLength", 40)
        for value in node.values():
            quick_to_generate(value)
    elif isinstance(node, list):
        for value in node:
            quick_to_generate(value)
    return node


RESPONSE_SCHEMAS = ("OpenAIError", "AnthropicError", "ModelObject")


def for_fuzzing(document):
    """The served document with its request schemas pinned and quick to generate; the
    response schemas the checks validate against stay exactly as served."""
    for name, schema in document["components"]["schemas"].items():
        if name not in RESPONSE_SCHEMAS:
            quick_to_generate(pin_model(schema))
    for item in document["paths"].values():
        for operation in item.values():
            quick_to_generate(pin_model(operation.get("requestBody", {})))
            quick_to_generate(operation.get("parameters", []))
    return document


def shape_problem(path, response):
    """Why an error response is not in its route's shape (None when it is)."""
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError:
        return "error body is not JSON"
    if path.startswith("/v1/messages"):
        error = body.get("error") if isinstance(body, dict) else None
        if body.get("type") != "error" or not isinstance(error, dict) or \
                set(error) != {"type", "message"} or not isinstance(error["message"], str):
            return "not Anthropic-shaped"
        if response.status_code == 400 and error["type"] != "invalid_request_error":
            return f"400 typed {error['type']}"
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"} \
            or not isinstance(error["message"], str):
        return "not OpenAI-shaped"
    if response.status_code == 400 and error["type"] != "invalid_request_error":
        return f"400 typed {error['type']}"
    return None


def test_fuzz_every_v1_route(live, capsys):
    key = live.member(credits=1_000_000, models=MODEL)
    auth = {"Authorization": f"Bearer {key}"}
    document = requests.get(live.base_url + "/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(for_fuzzing(document))
    http = requests.Session()
    run_seed = int(os.environ.get("FUZZ_SEED") or random.randrange(2**32))
    statuses = collections.Counter()
    per_route = collections.Counter()
    problems = []
    relayed = []  # x-request-id of every request the relay served
    started = time.monotonic()
    spent = collections.Counter()  # seconds waiting for the gateway / validating answers

    def exercise(case):
        sent = time.monotonic()
        response = case.call(base_url=live.url, session=http, headers=auth, timeout=15)
        answered = time.monotonic()
        spent["http"] += answered - sent
        path = case.operation.path
        statuses[response.status_code] += 1
        per_route[f"{case.method} {path}"] += 1
        where = f"{case.method} {path} -> {response.status_code}"
        problem = shape_problem(path, response)
        if "Traceback" in response.text or 'File "/' in response.text:
            problem = "traceback in the body"
        if problem:
            problems.append(f"{where}: {problem}: {response.text[:300]!r} for "
                            f"{str(case.body)[:300]!r}")
        try:
            case.validate_response(response, checks=list(SCHEMA_CHECKS), headers=auth)
        except (Exception, FailureGroup) as failure:  # noqa: BLE001 - reported together below
            kinds = [f"{f.code} {f.title}" for f in getattr(failure, "exceptions", ())]
            problems.append(f"{where}: {kinds or type(failure).__name__}: {str(failure)[:600]} "
                            f"for {str(case.body)[:300]!r}")
        spent["checks"] += time.monotonic() - answered
        if case.method == "POST" and path in LOGGED:
            relayed.append((response.headers.get("x-request-id") or [None])[0])

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            runner = seed(run_seed)(settings(
                max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                phases=[Phase.explicit, Phase.generate], print_blob=False,
                suppress_health_check=list(HealthCheck))(
                given(operation.as_strategy(generation_mode=mode))(exercise)))
            try:
                runner()
            except Exception as err:  # noqa: BLE001 - e.g. nothing to negate in a GET
                if "Unsatisfiable" not in type(err).__name__ and \
                        "Unsatisfiable" not in str(err):
                    raise
    elapsed = time.monotonic() - started
    cases = sum(statuses.values())

    rows = live.wait_logs(len(relayed), timeout=30)
    logged = {row["request_id"] for row in rows}
    missing = [rid for rid in relayed if rid not in logged]

    figures = (f"[fuzz] seed {run_seed}: {cases} cases in {elapsed:.1f} s "
               f"({spent['http']:.1f} s waiting for the gateway, {spent['checks']:.1f} s "
               f"checking, the rest generating); statuses {dict(sorted(statuses.items()))}; "
               f"{len(relayed)} relayed, {len(relayed) - len(missing)} with their log row\n"
               "[fuzz] per route: " + ", ".join(f"{k} {v}" for k, v in sorted(per_route.items())))
    with capsys.disabled():  # shown even when pytest captures output (not under xdist)
        print("\n" + figures)
    os.makedirs(ARTIFACTS, exist_ok=True)  # ...and kept for xdist runs, where it is not
    with open(os.path.join(ARTIFACTS, "fuzz_v1.txt"), "w") as out:
        out.write(figures + "\n")
    assert cases >= 2000, f"only {cases} cases generated"
    server_errors = [p for p in problems if " -> 5" in p.split(": ", 1)[0]]
    assert not [s for s in statuses if s >= 500], \
        f"5xx answers (seed {run_seed}): {dict(statuses)}\n" + "\n".join(server_errors[:5])
    kinds = collections.Counter(p.split(": ", 2)[0] + ": " + p.split(": ", 2)[1][:80]
                                for p in problems)
    assert not problems, f"{len(problems)} problems (seed {run_seed}): {dict(kinds)}\n" + \
        "\n".join(problems[:10])
    assert None not in relayed and not missing, f"{len(missing)} relayed requests lack a log row"
