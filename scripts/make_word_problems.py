"""Generate the bundled word-problem data (fttool/assets/word_problems/): one-step arithmetic stories in GSM8K's
answer format (a worked line, then `#### N`), small enough for a 135M model to learn on a laptop CPU in minutes.

The data is made by this script alone (no third-party text), so it ships with fttool under its own license.
Run: python scripts/make_word_problems.py  (deterministic: the same seed gives the same files).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "fttool" / "assets" / "word_problems"
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Mateo",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yusuf", "Zoe"]  # fmt: skip
THINGS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells", "cards", "coins",
          "eggs", "balloons", "buttons", "crayons", "plums", "beads"]  # fmt: skip


def _story(rng: random.Random):
    """(question, worked answer, final number) of one of four one-step kinds."""
    name, other = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    kind = rng.choice(["add", "sub", "mul", "share"])
    if kind == "add":
        a, b = rng.randint(3, 60), rng.randint(3, 40)
        q = rng.choice(
            [
                f"{name} has {a} {thing}. {other} gives {name} {b} more. How many {thing} does {name} have now?",
                f"{name} picked {a} {thing} in the morning and {b} {thing} in the afternoon. How many {thing} did "
                f"{name} pick in all?",
            ]
        )
        return q, f"{a} + {b} = {a + b}", a + b
    if kind == "sub":
        a = rng.randint(10, 80)
        b = rng.randint(2, a - 1)
        q = rng.choice(
            [
                f"{name} had {a} {thing} and gave {b} of them to {other}. How many {thing} does {name} have left?",
                f"There were {a} {thing} in a box. {name} took out {b}. How many {thing} are still in the box?",
            ]
        )
        return q, f"{a} - {b} = {a - b}", a - b
    if kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        q = f"{name} has {a} bags with {b} {thing} in each bag. How many {thing} does {name} have?"
        return q, f"{a} x {b} = {a * b}", a * b
    n, k = rng.randint(2, 9), rng.randint(2, 9)
    q = f"{name} shares {n * k} {thing} equally among {n} friends. How many {thing} does each friend get?"
    return q, f"{n * k} / {n} = {k}", k


def rows(n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        q, work, answer = _story(rng)
        yield {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"{work}\n#### {answer}"}]}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    train = list(rows(2000, seed=1))
    seen = {r["messages"][0]["content"] for r in train}
    test = [r for r in rows(200, seed=2) if r["messages"][0]["content"] not in seen][:100]  # held out: unseen questions
    for name, part in (("train", train), ("test", test)):
        with open(OUT / f"{name}.jsonl", "w") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
        print(f"{OUT / name}.jsonl: {len(part)} rows")


if __name__ == "__main__":
    main()
