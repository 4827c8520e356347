"""Markdown table of passkey grids with Wilson 95% intervals, for docs/SELFEXTEND.md.

    python scripts/selfextend_table.py eval-selfextend/passkey.json
"""

import json
import sys
from pathlib import Path

from ctxext.evals.retrieval import wilson


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    trials, depths = data["protocol"]["trials"], data["protocol"]["depths"]
    print(f"| model | length | {' | '.join(f'depth {d:g}' for d in depths)} | all depths |")
    print("|---|---:|" + "---:|" * (len(depths) + 1))
    for label, grid in data["models"].items():
        for length, row in grid["accuracy"].items():
            cells, total = [], 0
            for d in depths:
                correct = round(row[str(d)] * trials)
                total += correct
                lo, hi = wilson(correct, trials)
                cells.append(f"{correct}/{trials} [{lo:.2f}, {hi:.2f}]")
            lo, hi = wilson(total, trials * len(depths))
            print(f"| {label} | {length} | {' | '.join(cells)} | {total}/{trials * len(depths)} [{lo:.2f}, {hi:.2f}] |")


if __name__ == "__main__":
    main(sys.argv[1])
