"""Print the evaluation of several runs side by side: `python scripts/compare_runs.py DIR...`.

Each DIR is a run directory or a sweep directory; every results.json below it is read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> int:
    files = sorted({f for p in paths for f in Path(p).rglob("results.json")})
    if not files:
        print(f"no results.json under {' '.join(paths)}", file=sys.stderr)
        return 1
    rows = []
    attacks: list[str] = []
    for f in files:
        res = json.loads(f.read_text())
        cfg = res.get("config", {})
        ev = res.get("eval", {})
        for kind in ("best", "last"):
            entry = ev.get(kind)
            if not entry:
                continue
            accs = {name: a["accuracy"] for name, a in entry["attacks"].items()}
            attacks += [a for a in accs if a not in attacks]
            label = f"{cfg.get('defense', {}).get('name', '?')} ({kind}, epoch {entry.get('epoch')})"
            rows.append((label, accs, ev.get("n_examples")))
    width = max(len(r[0]) for r in rows)
    print(f"{'run'.ljust(width)}  " + "  ".join(f"{a:>8}" for a in attacks) + "  n")
    for label, accs, n in rows:
        cells = "  ".join(f"{accs[a]:8.2f}" if a in accs else f"{'-':>8}" for a in attacks)
        print(f"{label.ljust(width)}  {cells}  {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["outputs"]))
