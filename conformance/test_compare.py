#!/usr/bin/env python3
"""Self-test of compare.py: python3 conformance/test_compare.py

Runs compare.py as a program (as conformance/autobahn does) on index.json
files built from the committed expected-results.json, with cases changed,
removed or added, and checks the exit status and what it lists.
"""

import copy
import json
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
COMPARE = os.path.join(HERE, "compare.py")
EXPECTED = os.path.join(HERE, "expected-results.json")

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, HERE)
import compare  # noqa: E402


def index_from(expected, agent="127.0.0.1:54321"):
    """An index.json as kosoku writes it, for the given per-case results."""
    cases = {}
    for n, (case_id, result) in enumerate(expected.items()):
        cases[case_id] = dict(result, duration=n % 7,
                              reportfile=f"127_0_0_1_54321_case_{case_id.replace('.', '_')}.json")
    return {agent: cases}


class CompareProgram(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        with open(EXPECTED, encoding="utf-8") as f:
            self.expected = json.load(f)
        self.assertGreater(len(self.expected), 200)
        self.expected_path = os.path.join(self.tmp.name, "expected.json")
        with open(self.expected_path, "w", encoding="utf-8") as f:
            json.dump(self.expected, f)

    def run_compare(self, index, *extra, expected_path=None):
        index_path = os.path.join(self.tmp.name, "index.json")
        with open(index_path, "w", encoding="utf-8") as f:
            json.dump(index, f)
        proc = subprocess.run(
            [sys.executable, COMPARE, *extra, index_path, expected_path or self.expected_path],
            capture_output=True, text=True, check=False)
        return proc.returncode, proc.stdout + proc.stderr

    def test_identical_run_passes(self):
        rc, out = self.run_compare(index_from(self.expected))
        self.assertEqual(rc, 0, out)
        self.assertIn("every case as expected", out)
        self.assertNotIn("CHANGED", out)

    def test_agent_port_is_ignored(self):
        rc, out = self.run_compare(index_from(self.expected, agent="127.0.0.1:1"))
        self.assertEqual(rc, 0, out)

    def test_failed_case_and_missing_case_are_listed(self):
        index = index_from(self.expected)
        cases = index["127.0.0.1:54321"]
        cases["1.1.1"]["behavior"] = "FAILED"
        del cases["2.1"]
        rc, out = self.run_compare(index)
        self.assertEqual(rc, 1, out)
        self.assertIn("1 changed, 1 missing, 0 extra, 1 FAILED/ERROR", out)
        self.assertIn("CHANGED 1.1.1: behavior OK -> FAILED", out)
        self.assertIn("MISSING 2.1: expected behavior=OK", out)
        self.assertRegex(out, rf"conformance summary: {len(self.expected) - 1} cases: "
                              r"OK \d+ / .* / FAILED 1\n")
        # Nothing else is listed.
        listed = [l for l in out.splitlines() if l.startswith("  ") and not l.startswith("   ")]
        self.assertEqual(len(listed), 2, out)

    def test_close_code_change_alone_is_a_difference(self):
        index = index_from(self.expected)
        case_id = next(c for c, r in self.expected.items() if r["remoteCloseCode"] == 1002)
        index["127.0.0.1:54321"][case_id]["remoteCloseCode"] = 1000
        rc, out = self.run_compare(index)
        self.assertEqual(rc, 1, out)
        self.assertIn(f"CHANGED {case_id}: remoteCloseCode 1002 -> 1000", out)

    def test_behavior_close_change_is_a_difference(self):
        index = index_from(self.expected)
        index["127.0.0.1:54321"]["7.1.1"]["behaviorClose"] = "WRONG CODE"
        rc, out = self.run_compare(index)
        self.assertEqual(rc, 1, out)
        self.assertIn("CHANGED 7.1.1: behaviorClose OK -> WRONG CODE", out)

    def test_no_close_code_to_some_close_code(self):
        expected = {"7.3.1": {"behavior": "OK", "behaviorClose": "OK", "remoteCloseCode": None}}
        with open(self.expected_path, "w", encoding="utf-8") as f:
            json.dump(expected, f)
        index = index_from(expected)
        index["127.0.0.1:54321"]["7.3.1"]["remoteCloseCode"] = 1000
        rc, out = self.run_compare(index)
        self.assertEqual(rc, 1, out)
        self.assertIn("CHANGED 7.3.1: remoteCloseCode None -> 1000", out)

    def test_extra_case_is_a_difference(self):
        index = index_from(self.expected)
        # A case the suite does not have (12.* and 13.* are expected now).
        index["127.0.0.1:54321"]["14.1.1"] = {
            "behavior": "UNIMPLEMENTED", "behaviorClose": "OK", "remoteCloseCode": 1000,
            "duration": 0, "reportfile": "x.json"}
        rc, out = self.run_compare(index)
        self.assertEqual(rc, 1, out)
        self.assertIn("EXTRA   14.1.1", out)
        self.assertIn("UNIMPLEMENTED 1", out)

    def test_failed_is_fatal_even_when_expected(self):
        expected = copy.deepcopy(self.expected)
        expected["1.1.1"]["behavior"] = "FAILED"
        with open(self.expected_path, "w", encoding="utf-8") as f:
            json.dump(expected, f)
        rc, out = self.run_compare(index_from(expected))
        self.assertEqual(rc, 1, out)
        self.assertIn("FAILED  1.1.1", out)

    def test_error_is_fatal(self):
        index = index_from(self.expected)
        index["127.0.0.1:54321"]["1.1.2"]["behavior"] = "ERROR"
        rc, out = self.run_compare(index)
        self.assertEqual(rc, 1, out)
        self.assertIn("ERROR 1", out)
        self.assertIn("0 missing, 0 extra, 1 FAILED/ERROR", out)

    def test_kosoku_verdict_from_report_file_is_shown(self):
        index = index_from(self.expected)
        case = index["127.0.0.1:54321"]["5.1"]
        case["behavior"] = "FAILED"
        with open(os.path.join(self.tmp.name, case["reportfile"]), "w", encoding="utf-8") as f:
            json.dump({"result": "Expected close 1002, got 1000.", "resultClose": "WRONG CODE"}, f)
        rc, out = self.run_compare(index)
        self.assertEqual(rc, 1, out)
        self.assertIn("kosoku: Expected close 1002, got 1000.; WRONG CODE", out)

    def test_two_agents_is_an_input_error(self):
        index = index_from(self.expected)
        index["127.0.0.1:2"] = index["127.0.0.1:54321"]
        rc, out = self.run_compare(index)
        self.assertEqual(rc, 2, out)

    def test_missing_expected_file_is_an_input_error(self):
        rc, out = self.run_compare(index_from(self.expected),
                                   expected_path=os.path.join(self.tmp.name, "none.json"))
        self.assertEqual(rc, 2, out)

    def test_update_writes_stable_sorted_file(self):
        index = index_from(self.expected)
        rc, out = self.run_compare(index, "--update")
        self.assertEqual(rc, 0, out)
        with open(self.expected_path, encoding="utf-8") as f:
            first = f.read()
        self.assertEqual(json.loads(first), self.expected)
        keys = list(json.loads(first))
        self.assertEqual(keys, sorted(keys, key=compare.case_key))
        self.assertLess(keys.index("9.8.6"), keys.index("10.1.1"))
        self.assertEqual(len(first.splitlines()), len(keys) + 2)  # one case per line
        rc, out = self.run_compare(index, "--update")
        with open(self.expected_path, encoding="utf-8") as f:
            self.assertEqual(f.read(), first)

    def test_update_refuses_failed_case(self):
        index = index_from(self.expected)
        index["127.0.0.1:54321"]["1.1.1"]["behavior"] = "FAILED"
        with open(self.expected_path, encoding="utf-8") as f:
            before = f.read()
        rc, out = self.run_compare(index, "--update")
        self.assertEqual(rc, 1, out)
        self.assertIn("not updating", out)
        with open(self.expected_path, encoding="utf-8") as f:
            self.assertEqual(f.read(), before)


class CommittedFile(unittest.TestCase):
    def test_committed_expected_results_are_canonical(self):
        with open(EXPECTED, encoding="utf-8") as f:
            text = f.read()
        self.assertEqual(text, compare.dump_expected(json.loads(text)),
                         "expected-results.json is not in the form --update writes")

    def test_committed_expected_results_have_no_failures(self):
        expected = compare.load_expected(EXPECTED)
        bad = [c for c, r in expected.items()
               if r["behavior"] in compare.FATAL_BEHAVIOR
               or r["behaviorClose"] in compare.FATAL_BEHAVIOR_CLOSE]
        self.assertEqual(bad, [])

    def test_case_order(self):
        ids = ["10.1.1", "9.10.1", "9.2.1", "1.1.10", "1.1.2", "7.13.1", "7.7.10"]
        self.assertEqual(sorted(ids, key=compare.case_key),
                         ["1.1.2", "1.1.10", "7.7.10", "7.13.1", "9.2.1", "9.10.1", "10.1.1"])


if __name__ == "__main__":
    unittest.main(verbosity=1)
