"""Write the bundled preference demo (fttool/assets/demo/pairs_*.jsonl) from the demo's reverse-the-words rows:
the correct reversal is chosen; the rejected reply is the words in their original order, or the reversal with two
neighbouring words swapped. Test pairs come from the demo's held-out test rows. Deterministic (seeded).

    python scripts/make_demo_pairs.py
"""

import json
from pathlib import Path

from fttool.testing import reverse_pairs

DEMO = Path(__file__).resolve().parents[1] / "fttool" / "assets" / "demo"
TRAIN_PAIRS = 2000


def main() -> None:
    for source, target, limit, seed in (
        ("train.jsonl", "pairs_train.jsonl", TRAIN_PAIRS, 0),
        ("test.jsonl", "pairs_test.jsonl", None, 1),
    ):
        rows = [json.loads(line) for line in (DEMO / source).read_text().splitlines()]
        pairs = reverse_pairs(rows, seed)[:limit]
        (DEMO / target).write_text("".join(json.dumps(p) + "\n" for p in pairs))
        print(f"{target}: {len(pairs)} pairs")


if __name__ == "__main__":
    main()
