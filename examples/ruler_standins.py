"""Synthetic stand-ins for RULER's user-provided files, in RULER's input formats.

    python3 examples/ruler_standins.py DIR

writes DIR/essay.json ({"text": ...}, as RULER's PaulGrahamEssays.json), DIR/squad.json (SQuAD
2.0 dev layout) and DIR/hotpotqa.json (HotpotQA distractor dev layout): random sentences from a
small vocabulary, each QA answer a made-up code stated once in one paragraph. They let the
essay and qa tasks run where the real files are absent (docs/RESULTS.md's tiny-model table);
scores on them are NOT comparable with RULER's (README: Evaluation).
"""

import json
import os
import random
import sys

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river stone garden window letter music paper city road "
         "light story water house night question money book family idea morning voice field").split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))).capitalize() + rng.choice("..?!")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python3 examples/ruler_standins.py DIR", file=sys.stderr)
        return 2
    out, rng = argv[0], random.Random(0)
    os.makedirs(out, exist_ok=True)
    essay = "\n\n".join(" ".join(sentence(rng) for _ in range(8)) for _ in range(200))
    articles = []
    for a in range(20):
        paragraphs = []
        for p in range(5):
            code = f"{rng.choice(WORDS)}-{rng.randint(100, 999)}"
            text = " ".join(sentence(rng) for _ in range(3))
            paragraphs.append({"context": f"{text} The code of hall {a}.{p} is {code}. {sentence(rng)}",
                               "qas": [{"id": f"{a}.{p}", "question": f"What is the code of hall {a}.{p}?",
                                        "answers": [{"text": code, "answer_start": 0}], "is_impossible": False}]})
        articles.append({"title": f"Stand-in {a}", "paragraphs": paragraphs})
    hotpot = []
    for q in range(100):
        context = [[f"Bridge {q}.{i}", [sentence(rng) + " " for _ in range(2)]] for i in range(4)]
        year = str(rng.randint(1800, 2000))
        context[rng.randrange(4)][1].append(f"Bridge {q} opened in {year}.")
        hotpot.append({"_id": str(q), "question": f"When did bridge {q} open?", "answer": year, "type": "bridge",
                       "level": "easy", "supporting_facts": [], "context": context})
    for name, data in (("essay.json", {"text": essay}), ("squad.json", {"version": "v2.0", "data": articles}),
                       ("hotpotqa.json", hotpot)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            json.dump(data, f)
        print(os.path.join(out, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
