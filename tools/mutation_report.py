"""Write the mutation-testing report after `make mutate`: the score over the core modules and every
surviving mutant with its diff, minus the reviewed ones in tools/mutation_equivalent.txt: equivalent
mutants (left out of the score), and mutants killed by tests mutmut cannot trace (torchrun subprocesses),
whose reason starts with "killed by" (counted as killed).

    python tools/mutation_report.py [--out mutation-report.md]

Reads ``mutmut results --all true`` (one ``name: status`` line per mutant) and each survivor's code from
the mutated sources under ``mutants/`` (its function against the original, as a diff).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = ROOT / "tools" / "mutation_equivalent.txt"
MUTMUT = [sys.executable, "-m", "mutmut"]


def scope() -> list[str]:
    """The mutant name patterns of `make mutate` (the Makefile's MUTATE variable)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("MUTATE :="):
            return shlex.split(line.split(":=", 1)[1])
    raise SystemExit("Makefile has no MUTATE := line")


def equivalent() -> dict[str, str]:
    """Reviewed equivalent mutants: ``name  reason`` per line, ``#`` comments."""
    out = {}
    for raw in EQUIVALENT.read_text().splitlines():
        line = raw.split("#", 1)[0].strip() if raw.lstrip().startswith("#") else raw.strip()
        if line:
            name, _, reason = line.partition(" ")
            out[name] = reason.strip()
    return out


def statuses(patterns: list[str]) -> dict[str, str]:
    text = subprocess.run([*MUTMUT, "results", "--all", "true"], capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout
    out = {}
    for line in text.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and any(fnmatch.fnmatch(name, p) for p in patterns):
            out[name] = status
    return out


def function_sources(module: str) -> dict[str, str]:
    """Every function and method of a mutated module by its mutmut name (``x_f__mutmut_3``)."""
    path = ROOT / "mutants" / "src" / Path(*module.split(".")).with_suffix(".py")
    if not path.is_file():
        return {}
    text = path.read_text()
    lines = text.splitlines()
    return {node.name: "\n".join(lines[node.lineno - 1 : node.end_lineno]) for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and "__mutmut_" in node.name}


def mutant_diff(name: str, cache: dict[str, dict[str, str]]) -> str:
    module, _, function = name.rpartition(".")
    sources = cache.setdefault(module, function_sources(module))
    original = sources.get(function.rsplit("__mutmut_", 1)[0] + "__mutmut_orig")
    mutant = sources.get(function)
    if original is None or mutant is None:
        return "(source not found: run `mutmut show NAME`)"
    mutant = mutant.replace(function + "(", function.rsplit("__mutmut_", 1)[0] + "__mutmut_orig(", 1)
    lines = difflib.unified_diff(original.splitlines(), mutant.splitlines(), lineterm="", n=1)
    return "\n".join(line for line in lines if not line.startswith(("---", "+++")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "mutation-report.md"))
    args = parser.parse_args()
    found = statuses(scope())
    reviewed = equivalent()
    counts = Counter(found.values())
    survivors = sorted(n for n, s in found.items() if s == "survived" and n not in reviewed)
    outside = sorted(n for n, s in found.items() if s == "survived" and reviewed.get(n, "").startswith("killed by"))
    equivalent_seen = sorted(n for n, s in found.items() if s == "survived" and n in reviewed and n not in outside)
    killed = sum(counts[s] for s in ("killed", "timeout", "segfault", "suspicious")) + len(outside)
    judged = killed + len(survivors)
    score = killed / judged if judged else 0.0
    lines = ["# Mutation testing: surviving mutants", "",
             f"Core modules ({len(found)} mutants): {dict(sorted(counts.items()))}.", "",
             f"**Score: {killed} of {judged} non-equivalent mutants killed ({100 * score:.1f}%)**; "
             f"{len(outside)} of them killed by tests mutmut cannot trace (torchrun); "
             f"{len(equivalent_seen)} survivors reviewed as equivalent (tools/mutation_equivalent.txt); "
             f"{counts['no tests']} mutants in code no selected test reaches; {counts['not checked']} not run yet.",
             ""]
    sources: dict[str, dict[str, str]] = {}
    for name in survivors:
        lines += [f"## {name}", "", "```diff", mutant_diff(name, sources), "```", ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"{killed}/{judged} killed ({100 * score:.1f}%), {len(survivors)} survivors to look at, "
          f"{len(equivalent_seen)} equivalent; report: {args.out}")
    stale = sorted(set(reviewed) - set(found))
    if stale:
        print(f"{len(stale)} names in {EQUIVALENT.name} match no mutant any more: {stale[:5]}...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
