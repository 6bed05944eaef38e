#!/usr/bin/env python3
"""Compare an Autobahn/kosoku index.json with conformance/expected-results.json.

    compare.py INDEX EXPECTED            print the summary and every difference;
                                         exit 1 if any case differs, is missing
                                         or extra, or is FAILED/ERROR
    compare.py --update INDEX EXPECTED   rewrite EXPECTED from INDEX (refused if
                                         a case is FAILED/ERROR)

INDEX is what kosoku writes: {"127.0.0.1:PORT": {"1.1.1": {"behavior": ...,
"behaviorClose": ..., "remoteCloseCode": ..., "duration": ..., "reportfile":
...}, ...}}. The agent key (address and port) is dropped; per case only
behavior, behaviorClose and remoteCloseCode are compared (duration changes
from run to run). EXPECTED holds one case per line, in case order:
{"1.1.1": {"behavior": "OK", "behaviorClose": "OK", "remoteCloseCode": 1000}, ...}

Exit status: 0 all as expected, 1 differences or failures, 2 unreadable input.
"""

import json
import os
import sys
from collections import Counter

FIELDS = ("behavior", "behaviorClose", "remoteCloseCode")
# The verdicts Autobahn counts in its summary, in its order.
SUMMARY = ("OK", "NON-STRICT", "INFORMATIONAL", "FAILED")
# Printed only when some case has them.
SUMMARY_IF_ANY = ("UNIMPLEMENTED", "ERROR")
# A case with one of these is never acceptable, whatever EXPECTED says.
FATAL_BEHAVIOR = ("FAILED", "ERROR")
FATAL_BEHAVIOR_CLOSE = ("FAILED",)


class InputError(Exception):
    pass


def case_key(case_id):
    """Sort "9.10.1" after "9.2.1" and "10.1.1" after "9.*"."""
    parts = []
    for part in case_id.split("."):
        parts.append((0, int(part), "") if part.isdigit() else (1, 0, part))
    return parts


def normalise_index(index):
    """{agent: {case: result}} -> {case: {field: value}}, agent dropped."""
    if not isinstance(index, dict) or len(index) != 1:
        agents = list(index) if isinstance(index, dict) else type(index).__name__
        raise InputError(f"expected results for exactly one agent, got {agents}")
    (agent, cases), = index.items()
    if not isinstance(cases, dict):
        raise InputError(f"results for {agent} are not an object")
    out = {}
    for case_id, result in cases.items():
        missing = [f for f in FIELDS if f not in result]
        if missing:
            raise InputError(f"case {case_id} has no {', '.join(missing)}")
        out[case_id] = {f: result[f] for f in FIELDS}
    return out


def load_expected(path):
    with open(path, encoding="utf-8") as f:
        expected = json.load(f)
    if not isinstance(expected, dict):
        raise InputError(f"{path}: not a JSON object")
    for case_id, result in expected.items():
        missing = [f for f in FIELDS if f not in result]
        if missing:
            raise InputError(f"{path}: case {case_id} has no {', '.join(missing)}")
    return expected


def dump_expected(cases):
    """One case per line, cases in case order, fields sorted: diffs stay one line per case."""
    lines = []
    for case_id in sorted(cases, key=case_key):
        result = {f: cases[case_id][f] for f in sorted(FIELDS)}
        lines.append(f"  {json.dumps(case_id)}: {json.dumps(result, sort_keys=True)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def summary_line(cases):
    counts = Counter(r["behavior"] for r in cases.values())
    names = list(SUMMARY)
    names += [n for n in SUMMARY_IF_ANY if counts[n]]
    names += sorted(n for n in counts if n not in names)
    body = " / ".join(f"{n} {counts[n]}" for n in names)
    return f"{len(cases)} cases: {body}"


def fmt(result):
    return " ".join(f"{f}={result[f]}" if result[f] is not None else f"{f}=none"
                    for f in FIELDS)


def report_result(index_dir, index_cases, case_id):
    """kosoku's one-line verdict for a case, from its report file, if present."""
    if index_dir is None:
        return None
    name = index_cases.get(case_id, {}).get("reportfile")
    if not name:
        return None
    try:
        with open(os.path.join(index_dir, name), encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    parts = [report.get("result"), report.get("resultClose")]
    return "; ".join(p for p in parts if p) or None


def compare(actual, expected, index_dir=None, raw_cases=None):
    """Return (lines, ok): human-readable findings and whether all is as expected."""
    raw_cases = raw_cases or {}
    lines = []
    changed, missing, extra, fatal = [], [], [], []
    for case_id in sorted(set(actual) | set(expected), key=case_key):
        a, e = actual.get(case_id), expected.get(case_id)
        if a is None:
            missing.append(case_id)
            lines.append(f"  MISSING {case_id}: expected {fmt(e)}, not in this run")
            continue
        if a["behavior"] in FATAL_BEHAVIOR or a["behaviorClose"] in FATAL_BEHAVIOR_CLOSE:
            fatal.append(case_id)
        if e is None:
            extra.append(case_id)
            lines.append(f"  EXTRA   {case_id}: {fmt(a)}, not in the expected results")
        elif any(a[f] != e[f] for f in FIELDS):
            changed.append(case_id)
            diffs = ", ".join(f"{f} {e[f]} -> {a[f]}" for f in FIELDS if a[f] != e[f])
            lines.append(f"  CHANGED {case_id}: {diffs}")
        elif case_id in fatal:
            lines.append(f"  FAILED  {case_id}: {fmt(a)} (expected, but never acceptable)")
        else:
            continue
        why = report_result(index_dir, raw_cases, case_id)
        if why:
            lines.append(f"          kosoku: {why}")
    ok = not (changed or missing or extra or fatal)
    head = (f"{len(changed)} changed, {len(missing)} missing, {len(extra)} extra, "
            f"{len(fatal)} FAILED/ERROR")
    return [head] + lines, ok


def main(argv):
    args = list(argv)
    update = "--update" in args
    if update:
        args.remove("--update")
    if len(args) != 2 or any(a.startswith("-") for a in args):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    index_path, expected_path = args

    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        actual = normalise_index(index)
        raw_cases = next(iter(index.values()))
    except (OSError, ValueError, InputError) as err:
        print(f"compare: {index_path}: {err}", file=sys.stderr)
        return 2

    print(f"conformance summary: {summary_line(actual)}")

    if update:
        fatal = sorted((c for c, r in actual.items()
                        if r["behavior"] in FATAL_BEHAVIOR
                        or r["behaviorClose"] in FATAL_BEHAVIOR_CLOSE), key=case_key)
        if fatal:
            print(f"compare: not updating {expected_path}: FAILED/ERROR cases "
                  f"{', '.join(fatal)}", file=sys.stderr)
            return 1
        with open(expected_path, "w", encoding="utf-8") as f:
            f.write(dump_expected(actual))
        print(f"compare: wrote {len(actual)} cases to {expected_path}")
        return 0

    try:
        expected = load_expected(expected_path)
    except (OSError, ValueError, InputError) as err:
        print(f"compare: {expected_path}: {err}", file=sys.stderr)
        return 2

    print(f"expected:            {summary_line(expected)}")
    lines, ok = compare(actual, expected, os.path.dirname(os.path.abspath(index_path)),
                        raw_cases)
    if ok:
        print("conformance: every case as expected")
        return 0
    print("conformance: DIFFERENCES from the expected results: " + lines[0])
    for line in lines[1:]:
        print(line)
    print("(if the change is intended: conformance/autobahn --update, and commit "
          "conformance/expected-results.json)")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
