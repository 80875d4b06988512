#!/usr/bin/env python3
"""Compares an Autobahn (kosoku) index.json with the committed expected results.

Usage: check.py INDEX_JSON EXPECTED_JSON [--write]

Prints the summary line (OK / NON-STRICT / INFORMATIONAL / FAILED counts) and exits non-zero
if any case is not passing (behavior OK or INFORMATIONAL, close behavior OK or INFORMATIONAL)
or differs from the expected results. --write regenerates EXPECTED_JSON from INDEX_JSON.
"""
import collections
import json
import sys

PASSING = {"OK", "INFORMATIONAL"}


def case_key(case):
    return tuple(int(p) for p in case.split("."))


def main():
    index_path, expected_path = sys.argv[1], sys.argv[2]
    with open(index_path) as f:
        index = json.load(f)
    if len(index) != 1:
        sys.exit(f"expected one agent in {index_path}, found {list(index)}")
    results = next(iter(index.values()))
    got = {
        case: {"behavior": r["behavior"], "behaviorClose": r["behaviorClose"]}
        for case, r in sorted(results.items(), key=lambda kv: case_key(kv[0]))
    }
    if "--write" in sys.argv:
        with open(expected_path, "w") as f:
            json.dump(got, f, indent=1)
            f.write("\n")
        print(f"wrote {len(got)} expected results to {expected_path}")

    counts = collections.Counter(r["behavior"] for r in got.values())
    print(
        "autobahn: {} cases: {} OK, {} NON-STRICT, {} INFORMATIONAL, {} FAILED, {} other".format(
            len(got),
            counts["OK"],
            counts["NON-STRICT"],
            counts["INFORMATIONAL"],
            counts["FAILED"],
            len(got) - sum(counts[k] for k in ("OK", "NON-STRICT", "INFORMATIONAL", "FAILED")),
        )
    )
    problems = []
    for case, r in got.items():
        if r["behavior"] not in PASSING or r["behaviorClose"] not in PASSING:
            problems.append(f"{case}: behavior {r['behavior']}, close {r['behaviorClose']}")
    with open(expected_path) as f:
        expected = json.load(f)
    for case in sorted(set(expected) | set(got), key=case_key):
        if expected.get(case) != got.get(case):
            problems.append(f"{case}: expected {expected.get(case)}, got {got.get(case)}")
    for p in problems:
        print("  " + p)
    if problems:
        sys.exit(1)
    print("autobahn: all cases pass and match expected-results.json")


if __name__ == "__main__":
    main()
