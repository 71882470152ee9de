"""The bundled task suite: four generated (seeded) tasks, each with an automatic scorer.

| task | shape | what | scorer |
|---|---|---|---|
| arithmetic | alpaca | two-step word problems | exact integer answer |
| strings | alpaca | reverse / sort / uppercase / dedupe lists and words | exact match |
| logic | alpaca | syllogisms, multiple choice A/B/C | accuracy of the letter |
| format | messages | follow an output format (repeat, JSON key, bullet list) | rule check |

They pull a model in different directions (numbers, symbol manipulation, short labels,
structured output), so the seesaw of multi-task SFT shows. ``make_suite`` writes
``DIR/<task>/{train,eval}.jsonl`` and ``DIR/suite.json``; the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Callable

from cpift_dist.io import atomic_dir

NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gia", "Hal"]
THINGS = ["apples", "books", "coins", "stamps", "marbles", "shells"]
WORDS = ["river", "cloud", "stone", "maple", "ember", "delta", "frost", "lumen", "coral"]
NONSENSE = ["bloops", "razzies", "lazzies", "wugs", "daxes", "feps", "tovs", "zibs"]
COLORS = ["red", "blue", "green", "amber", "violet"]


def _arithmetic(r: random.Random) -> dict:
    who, what = r.choice(NAMES), r.choice(THINGS)
    a, b, c = r.randint(5, 60), r.randint(2, 40), r.randint(1, 30)
    ans = a + b - c
    q = (f"{who} has {a} {what}, gets {b} more and then gives away {c}. "
         f"How many {what} does {who} have now? Answer with the number only.")
    return {"instruction": q, "input": "", "output": str(ans), "answer": ans}


def _strings(r: random.Random) -> dict:
    kind = r.choice(["reverse", "sort", "upper", "dedupe"])
    if kind == "upper":
        w = r.choice(WORDS)
        return {"instruction": "Write the word in capital letters.", "input": w,
                "output": w.upper(), "answer": w.upper()}
    xs = [r.randint(0, 9) for _ in range(r.randint(3, 7))]
    if kind == "reverse":
        ys, instr = xs[::-1], "Reverse the list."
    elif kind == "sort":
        ys, instr = sorted(xs), "Sort the list in ascending order."
    else:
        ys, instr = list(dict.fromkeys(xs)), "Remove repeated numbers, keeping first occurrences."
    out = "[" + ", ".join(map(str, ys)) + "]"
    return {"instruction": instr, "input": "[" + ", ".join(map(str, xs)) + "]", "output": out,
            "answer": out}


def _logic(r: random.Random) -> dict:
    a, b, c = r.sample(NONSENSE, 3)
    form = r.choice(["chain", "negated", "unknown"])
    if form == "chain":
        premises, ans = f"All {a} are {b}. All {b} are {c}.", "A"
    elif form == "negated":
        premises, ans = f"All {a} are {b}. No {b} are {c}.", "B"
    else:
        premises, ans = f"Some {a} are {b}. Some {b} are {c}.", "C"
    q = (f"{premises} Are all {a} {c}?\nA) yes\nB) no\nC) cannot be determined\n"
         f"Answer with the letter only.")
    return {"instruction": q, "input": "", "output": ans, "answer": ans}


def _format(r: random.Random) -> dict:
    kind = r.choice(["repeat", "json", "bullets"])
    if kind == "repeat":
        w, n = r.choice(WORDS), r.randint(2, 5)
        ask, out = f"Write the word '{w}' exactly {n} times, separated by commas.", ", ".join([w] * n)
        rule = {"kind": "repeat", "word": w, "n": n}
    elif kind == "json":
        color = r.choice(COLORS)
        ask = f"Reply with a JSON object whose only key is \"color\" and whose value is \"{color}\"."
        out = json.dumps({"color": color})
        rule = {"kind": "json", "value": color}
    else:
        items = r.sample(WORDS, r.randint(2, 4))
        ask = f"List these words as bullet points starting with '- ': {', '.join(items)}."
        out = "\n".join(f"- {w}" for w in items)
        rule = {"kind": "bullets", "items": items}
    return {"messages": [{"role": "system", "content": "Follow the output format exactly."},
                         {"role": "user", "content": ask},
                         {"role": "assistant", "content": out}], "rule": rule}


def _first_int(text: str) -> int | None:
    m = re.search(r"-?\d+", text)
    return int(m.group()) if m else None


def _score_format(response: str, ex: dict) -> float:
    rule, text = ex["rule"], response.strip()
    if rule["kind"] == "repeat":
        parts = [p.strip() for p in text.split(",")]
        return float(parts == [rule["word"]] * rule["n"])
    if rule["kind"] == "json":
        try:
            return float(json.loads(text) == {"color": rule["value"]})
        except ValueError:
            return 0.0
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return float(lines == [f"- {w}" for w in rule["items"]])


TASKS: dict[str, tuple[Callable, str]] = {
    "arithmetic": (_arithmetic, "alpaca"),
    "strings": (_strings, "alpaca"),
    "logic": (_logic, "alpaca"),
    "format": (_format, "messages"),
}

SCORERS: dict[str, Callable[[str, dict], float]] = {
    "arithmetic": lambda resp, ex: float(_first_int(resp) == ex["answer"]),
    "strings": lambda resp, ex: float(resp.strip() == ex["answer"]),
    "logic": lambda resp, ex: float(resp.strip()[:1].upper() == ex["answer"]),
    "format": _score_format,
}


def score(task: str, response: str, example: dict) -> float:
    """1.0 when ``response`` solves ``example`` of ``task`` (its automatic scorer), else 0.0."""
    return SCORERS[task](response, example)


def make_suite(out: str | Path, n_train: int = 512, n_eval: int = 64, seed: int = 0,
               overwrite: bool = False) -> dict:
    """Writes the suite (atomically); prompts are distinct while the generator has new ones, so
    held-out examples do not repeat training prompts."""
    meta = {"seed": seed, "tasks": {}}
    total = n_train + n_eval
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for task, (make, shape) in TASKS.items():
            r = random.Random(f"{seed}/{task}")
            rows, seen, attempts = [], set(), 0
            while len(rows) < total:  # distinct prompts while the generator has them
                ex = make(r)
                attempts += 1
                key = json.dumps(ex.get("messages") or [ex["instruction"], ex["input"]])
                if key in seen and attempts < 20 * total:
                    continue
                seen.add(key)
                rows.append(ex)
            (tmp / task).mkdir()
            for split, part in (("train", rows[:n_train]), ("eval", rows[n_train:])):
                with open(tmp / task / f"{split}.jsonl", "w") as f:
                    for ex in part:
                        f.write(json.dumps(ex) + "\n")
            meta["tasks"][task] = {"shape": shape, "train": n_train, "eval": n_eval,
                                   "scorer": task}
        (tmp / "suite.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
