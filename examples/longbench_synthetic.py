"""Write a small SYNTHETIC dataset in LongBench's JSONL format (not LongBench's data).

    python3 examples/longbench_synthetic.py OUT_DIR [--samples 4] [--seed 0]

For trying ``ratplus-eval --longbench`` where LongBench's own data cannot be fetched: four
tasks under LongBench's names, so that their templates, budgets, first-line rules and metrics
apply: ``hotpotqa`` (made-up people and birthplaces in numbered passages), ``trec`` (few-shot
question typing, with LongBench's ``all_classes`` field), ``samsum`` (few-shot dialogue
summaries) and ``lcc`` (the next line of a Python standard-library source file, the kind of text
the tiny preset trains on). Every record has LongBench's fields (``input``, ``context``,
``answers``, ``length`` in words, ``dataset``, ``language``, ``all_classes``, ``_id``) and
``"synthetic": true``. Scores on it say nothing about LongBench's tables.
"""

import argparse
import json
import os
import random
import sys

NAMES = ["Alma Reyes", "Boris Katz", "Chen Wei", "Dana Holt", "Emil Sorensen", "Farah Nadeem", "Gus Olsen",
         "Hana Ito", "Ivo Petrov", "Jun Park", "Kofi Mensah", "Lena Vogel"]
CITIES = ["Lisbon", "Tallinn", "Osaka", "Quito", "Accra", "Bergen", "Lyon", "Perth", "Tunis", "Cusco"]
TREC = [("Where is the Eiffel Tower ?", "Other location"), ("Who wrote Hamlet ?", "Individual"),
        ("How many feet are in a mile ?", "Count"), ("What does NASA stand for ?", "Expression abbreviated"),
        ("When did the war end ?", "Date"), ("What city hosts the fair ?", "City"),
        ("Who founded the company ?", "Individual"), ("How many moons does Mars have ?", "Count"),
        ("What is the capital of Peru ?", "City"), ("When was the bridge built ?", "Date")]
CLASSES = ["Other location", "Location", "Individual", "Count", "Expression abbreviated", "Date", "City", "Other"]
ITEMS = ["the report", "the keys", "lunch", "the tickets", "the slides", "a cake"]
DAYS = ["Monday", "Friday", "tomorrow", "tonight"]


def _record(task, number, context, question, answers, all_classes=None):
    return {"input": question, "context": context, "answers": answers, "length": len(context.split()),
            "dataset": task, "language": "en", "all_classes": all_classes, "_id": f"synthetic-{task}-{number}",
            "synthetic": True}


def hotpotqa(rng, n):
    for i in range(n):
        people = rng.sample(NAMES, min(len(NAMES), 2 + 2 * i))
        passages = [f"Passage {k + 1}:\n{p} was born in {rng.choice(CITIES)} and later moved abroad."
                    for k, p in enumerate(people)]
        target = rng.randrange(len(people))
        city = passages[target].split(" born in ")[1].split(" and ")[0]
        yield _record("hotpotqa", i, "\n".join(passages), f"Where was {people[target]} born?", [city])


def trec(rng, n):
    for i in range(n):
        shots = rng.sample(TREC, min(len(TREC) - 1, 3 + 2 * i))
        question, label = rng.choice([q for q in TREC if q not in shots])
        context = "\n".join(f"Question: {q}\nType: {t}" for q, t in shots)
        yield _record("trec", i, context, f"Question: {question}\nType:", [label], CLASSES)


def _dialogue(rng):
    a, b = rng.sample([name.split()[0] for name in NAMES], 2)
    item, day = rng.choice(ITEMS), rng.choice(DAYS)
    text = f"{a}: Can you bring {item} {day}?\r\n{b}: Sure, I will.\r\n{a}: Thanks!"
    return text, f"{b} will bring {item} to {a} {day}."


def samsum(rng, n):
    for i in range(n):
        shots = [_dialogue(rng) for _ in range(1 + i)]
        context = "\n".join(f"Dialogue: {d}\nSummary: {s}" for d, s in shots)
        dialogue, summary = _dialogue(rng)
        yield _record("samsum", i, context, f"Dialogue: {dialogue}\nSummary: ", [summary])


def lcc(rng, n):
    import importlib
    import inspect

    lines = [line for name in ("textwrap", "json.decoder")
             for line in inspect.getsource(importlib.import_module(name)).split("\n")]
    for i in range(n):
        size = 20 + 15 * i
        end = rng.randrange(size, len(lines) - 1)
        while not lines[end].strip():
            end += 1
        yield _record("lcc", i, "\n".join(lines[end - size:end]) + "\n", "", [lines[end]])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    for task in (hotpotqa, trec, samsum, lcc):
        rng = random.Random(f"{args.seed}-{task.__name__}")
        path = os.path.join(args.out_dir, f"{task.__name__}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in task(rng, args.samples))
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
