#!/usr/bin/env python3
"""Generate lorascope's bundled sample dataset (src/engine/data/sample_alpaca.jsonl).

The data is our own: templated instruction tasks with regular, short answers, so a tiny
byte-level model can visibly learn them within ~100 steps. Output is deterministic
(fixed seed, no dependence on dict/set ordering), so re-running this script reproduces
the committed file byte for byte.

Usage: python3 scripts/make_sample_data.py [OUTPUT]   (default: src/engine/data/sample_alpaca.jsonl)
"""

import json
import random
import sys
from pathlib import Path

SEED = 20240611
PER_TASK = 40

WORDS = [
    "apple", "river", "stone", "cloud", "tiger", "lemon", "bread", "chair", "green", "light",
    "music", "ocean", "plant", "quiet", "robot", "sugar", "table", "water", "zebra", "candle",
    "garden", "pencil", "rocket", "silver", "winter", "yellow", "bridge", "forest", "planet", "window",
]

CANNED = [
    ("Say hello.", "Hello!"),
    ("Say goodbye.", "Goodbye!"),
    ("What color is the sky on a clear day?", "The sky is blue."),
    ("How many days are in a week?", "There are 7 days in a week."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("How many months are in a year?", "There are 12 months in a year."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What is the opposite of up?", "The opposite of up is down."),
    ("What is the opposite of big?", "The opposite of big is small."),
    ("What is the first letter of the alphabet?", "The first letter is A."),
]


def add(rng):
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    return f"Add {a} and {b}.", "", f"{a} + {b} = {a + b}."


def subtract(rng):
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    a, b = max(a, b), min(a, b)
    return f"Subtract {b} from {a}.", "", f"{a} - {b} = {a - b}."


def multiply(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"Multiply {a} by {b}.", "", f"{a} x {b} = {a * b}."


def parity(rng):
    n = rng.randint(0, 999)
    kind = "even" if n % 2 == 0 else "odd"
    return "Is this number even or odd?", str(n), f"{n} is {kind}."


def next_number(rng):
    n = rng.randint(0, 998)
    return f"What number comes after {n}?", "", f"The number after {n} is {n + 1}."


def reverse(rng):
    w = rng.choice(WORDS)
    return "Reverse the word.", w, f"{w[::-1]}"


def upper(rng):
    w = rng.choice(WORDS)
    return "Write the word in capital letters.", w, w.upper()


def vowels(rng):
    w = rng.choice(WORDS)
    n = sum(1 for c in w if c in "aeiou")
    return "Count the vowels in the word.", w, f"The word {w} has {n} vowel{'' if n == 1 else 's'}."


def length(rng):
    w = rng.choice(WORDS)
    return f"How many letters are in the word {w}?", "", f"{w} has {len(w)} letters."


def meters(rng):
    m = rng.randint(1, 50)
    return f"Convert {m} meters to centimeters.", "", f"{m} m = {m * 100} cm."


def hours(rng):
    h = rng.randint(1, 24)
    return f"Convert {h} hours to minutes.", "", f"{h} h = {h * 60} min."


def kilograms(rng):
    k = rng.randint(1, 20)
    return f"Convert {k} kilograms to grams.", "", f"{k} kg = {k * 1000} g."


def canned(rng):
    q, a = rng.choice(CANNED)
    return q, "", a


TASKS = [add, subtract, multiply, parity, next_number, reverse, upper, vowels, length,
         meters, hours, kilograms, canned]


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else (
        Path(__file__).resolve().parent.parent / "src" / "engine" / "data" / "sample_alpaca.jsonl")
    rng = random.Random(SEED)
    records = []
    for task in TASKS:
        for _ in range(PER_TASK):
            instruction, inp, output = task(rng)
            records.append({"instruction": instruction, "input": inp, "output": output})
    rng.shuffle(records)
    lines = [json.dumps(r, ensure_ascii=True, separators=(", ", ": ")) for r in records]
    for line in lines:
        assert len(line.encode()) < 200, line
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(records)} records to {out}")


if __name__ == "__main__":
    main()
