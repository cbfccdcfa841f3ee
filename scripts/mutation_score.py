"""The mutation score of ``make mutate``, per module, from ``mutmut results --all true``.

score = killed / (killed + survived): mutants the chosen tests ran against. A timeout (a test
hung past its budget) and a segfault (the test process died: a mutant that SIGKILLs its own
process) count as killed; mutants no chosen test reaches
("no tests") are counted apart. The names of the survivors and of those no test reaches go
to mutants/survivors.txt and mutants/no-tests.txt: ``make mutate MUTATE_ARGS="$(cat
mutants/survivors.txt mutants/no-tests.txt)"`` runs them again against the current tests.
Run from the project's root after ``mutmut run``.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

KILLED = {"killed", "timeout", "segfault", "caught by type check"}


def module_of(mutant: str) -> str:
    """tasklab.jobs.store.x_claim__mutmut_3 -> tasklab.jobs.store"""
    dotted = mutant.split("__mutmut_")[0]
    return ".".join(part for part in dotted.split(".") if not part.startswith("x"))


def main() -> int:
    mutmut = Path(sys.executable).with_name("mutmut")
    out = subprocess.run(
        [str(mutmut), "results", "--all", "true"], capture_output=True, text=True, check=True
    ).stdout
    by_module: defaultdict[str, Counter[str]] = defaultdict(Counter)
    survivors: list[str] = []
    untested: list[str] = []
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if not sep:
            continue
        status = "killed" if status in KILLED else status
        by_module[module_of(name)][status] += 1
        if status == "survived":
            survivors.append(name)
        elif status == "no tests":
            untested.append(name)
    total: Counter[str] = sum(by_module.values(), Counter())
    print(f"{'module':32} {'killed':>7} {'survived':>9} {'no tests':>9} {'other':>6} {'score':>7}")
    for module, counts in [*sorted(by_module.items()), ("all", total)]:
        ran = counts["killed"] + counts["survived"]
        other = sum(counts.values()) - ran - counts["no tests"]
        score = f"{100 * counts['killed'] / ran:.1f}%" if ran else "-"
        print(
            f"{module:32} {counts['killed']:>7} {counts['survived']:>9} "
            f"{counts['no tests']:>9} {other:>6} {score:>7}"
        )
    Path("mutants").mkdir(exist_ok=True)
    Path("mutants/survivors.txt").write_text("".join(f"{s}\n" for s in survivors))
    Path("mutants/no-tests.txt").write_text("".join(f"{s}\n" for s in untested))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
