"""Writes bench/RESULTS.md from the JSON each benchmark left in bench/results/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import BENCH_DIR, RESULTS_DIR, _num, machine_label

ORDER = [
    "orchestration",
    "in_flight",
    "download",
    "rendering",
    "api",
    "stitching",
    "scenes",
    "fairness",
    "many_hosts",
]
# Hand-written: what each missed target turned out to be, and the figures before and after
# the fix. Appended to RESULTS.md as it is.
FINDINGS = BENCH_DIR / "FINDINGS.md"


def _target(text: str) -> str:
    return (
        text.replace("ratio", "ratio ")
        .replace("ours", "ours ")
        .replace("<=", "≤ ")
        .replace(">=", "≥ ")
        .replace("==", "= ")
    )


def _row(f: dict[str, Any], machine: str) -> str:
    ratio = f"{f['ratio']:.2f}x" if f.get("ratio") is not None else "–"
    base = _num(f["baseline"]) if f.get("baseline") is not None else "–"
    verdict = {True: "met", False: "**missed**", None: ""}[f.get("met")]
    target = f"{_target(f['target'])} {verdict}".strip() if f.get("target") else "(reported)"
    name = f["name"] + (f" ({f['note']})" if f.get("note") else "")
    return f"| {name} | {_num(f['ours'])} {f['unit']} | {base} | {ratio} | {target} | {machine} |"


def write_report() -> Path:
    results = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS_DIR.glob("*.json"))}
    lines = [
        "# Benchmark results",
        "",
        "Written by `python3 dev.py bench` (every benchmark) or `python3 dev.py bench NAME` "
        "(one; the others keep their last figures). Ratios are ours / baseline, both measured "
        "in the same run on the same machine. Raw numbers: `bench/results/*.json`.",
        "",
    ]
    for name in sorted(results, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        r = results[name]
        machine = machine_label(r["machine"])
        lines += [
            f"## {r['title']}",
            "",
            f"`python3 dev.py bench {name}`, run {r['started']}, took {r['seconds']:.0f} s.",
            "",
            "| Figure | Ours | Baseline | Ratio | Target | Machine |",
            "| --- | --- | --- | --- | --- | --- |",
            *(_row(f, machine) for f in r["figures"]),
            "",
        ]
    if FINDINGS.exists():
        lines += [FINDINGS.read_text().rstrip(), ""]
    path = BENCH_DIR / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path
