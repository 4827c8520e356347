"""Markdown table of passkey grids with Wilson 95% intervals, for docs/results/SELFEXTEND.md.

python scripts/selfextend_table.py eval-selfextend/passkey.json
"""

import json
import sys
from pathlib import Path

from ctxext.evals.retrieval import count_with_interval


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    trials, depths = data["protocol"]["trials"], data["protocol"]["depths"]
    print(f"| model | length | {' | '.join(f'depth {d:g}' for d in depths)} | all depths |")
    print("|---|---:|" + "---:|" * (len(depths) + 1))
    for label, grid in data["models"].items():
        for length, row in grid["accuracy"].items():
            correct = [round(row[str(d)] * trials) for d in depths]
            cells = [count_with_interval(c, trials) for c in correct]
            print(
                f"| {label} | {length} | {' | '.join(cells)} "
                f"| {count_with_interval(sum(correct), trials * len(depths))} |"
            )


if __name__ == "__main__":
    main(sys.argv[1])
