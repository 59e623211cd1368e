"""What RULER's tasks draw their text from: the files a user provides and the word lists.

- the essay haystack: Paul Graham's essays in RULER's ``PaulGrahamEssays.json`` (one JSON object
  ``{"text": "..."}``, what RULER's ``scripts/data/synthetic/json/download_paulgraham_essay.py``
  writes), split into words at runs of whitespace as RULER splits it;
- the qa tasks' documents and questions: SQuAD 2.0's dev file (``dev-v2.0.json``; ``data`` ->
  ``paragraphs`` -> ``context``/``qas``, unanswerable questions left out) and HotpotQA's
  distractor dev file (``hotpot_dev_distractor_v1.json``; a list of ``question``/``answer``/
  ``context`` = [[title, [sentences]], ...]), read into RULER's (questions, documents) form;
- English words from the ``wonderwords`` package's lists (nouns, adjectives, verbs), as RULER
  takes them (pip install wonderwords==3.0.1, in the ``eval`` extra).

Nothing is downloaded; a missing or malformed file is one DatasetMissingError line. Each file is
parsed once per process (the CLI checks the files before loading the model, then uses them).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

from megatron_ratplus.errors import first_line
from megatron_ratplus.evaluation.errors import DatasetMissingError

HOW_TO_GET = {
    "essay": "--ruler-essay: RULER's PaulGrahamEssays.json, {\"text\": ...}, written by RULER's "
             "scripts/data/synthetic/json/download_paulgraham_essay.py",
    "squad": "--ruler-qa-squad: SQuAD 2.0's dev-v2.0.json",
    "hotpotqa": "--ruler-qa-hotpot: HotpotQA's hotpot_dev_distractor_v1.json",
}


@lru_cache(maxsize=None)
def wonderwords_list(name: str) -> Tuple[str, ...]:
    """One of wonderwords' word lists ("nounlist.txt", "adjectivelist.txt", "verblist.txt")."""
    from importlib import resources

    from megatron_ratplus.optional import require

    require("wonderwords", "RULER's word tasks")
    text = (resources.files("wonderwords") / "assets" / name).read_text(encoding="utf-8")
    return tuple(line.rstrip() for line in text.splitlines())


@dataclass
class QaData:
    """RULER's form of a QA dev set: documents (sorted, unique) and questions that point into them."""
    questions: List[dict]  # {query, outputs, context: [doc ids], more_context: [doc ids]}
    documents: List[str]


def _load_json(path: str, what: str):
    if not os.path.isfile(path):
        raise DatasetMissingError(f"RULER {what} file not found: {path} (nothing is downloaded; {HOW_TO_GET[what]})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise DatasetMissingError(f"RULER {what} file {path} is not JSON: {first_line(err)}") from None


def _doc_ids(documents: List[str]) -> Dict[str, int]:
    return {doc: i for i, doc in enumerate(documents)}


@lru_cache(maxsize=None)
def read_essay(path: str) -> List[str]:
    """The essay text split at runs of whitespace, RULER's essay haystack."""
    data = _load_json(path, "essay")
    if not isinstance(data, dict) or not isinstance(data.get("text"), str) or not data["text"].strip():
        raise DatasetMissingError(f"{path} is not an essay file: expected {{\"text\": \"...\"}}")
    return re.sub(r"\s+", " ", data["text"]).split(" ")


@lru_cache(maxsize=None)
def read_squad(path: str) -> QaData:
    """SQuAD: every paragraph a document; a question's other paragraphs of the same article
    come first as its distractors."""
    data = _load_json(path, "squad")
    try:
        articles = data["data"]
        documents = sorted({p["context"] for a in articles for p in a["paragraphs"]})
        ids = _doc_ids(documents)
        questions = []
        for article in articles:
            same_article = [ids[p["context"]] for p in article["paragraphs"]]
            for paragraph in article["paragraphs"]:
                own = ids[paragraph["context"]]
                for qa in paragraph["qas"]:
                    if not qa.get("is_impossible", False):
                        questions.append(dict(query=qa["question"], outputs=[a["text"] for a in qa["answers"]],
                                              context=[own], more_context=[i for i in same_article if i != own]))
    except (KeyError, TypeError) as err:
        raise DatasetMissingError(f"{path} is not a SQuAD file ({type(err).__name__}: {err})") from None
    return QaData(questions, documents)


@lru_cache(maxsize=None)
def read_hotpotqa(path: str) -> QaData:
    """HotpotQA: every paragraph "title\\nsentences" a document; a question's ten paragraphs
    (supporting and distractor) are its own."""
    data = _load_json(path, "hotpotqa")
    try:
        paragraphs = [[f"{title}\n{''.join(sentences)}" for title, sentences in item["context"]] for item in data]
        documents = sorted({doc for docs in paragraphs for doc in docs})
        ids = _doc_ids(documents)
        questions = [dict(query=item["question"], outputs=[item["answer"]], context=[ids[d] for d in docs],
                          more_context=[]) for item, docs in zip(data, paragraphs)]
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetMissingError(f"{path} is not a HotpotQA file ({type(err).__name__}: {err})") from None
    return QaData(questions, documents)


@dataclass(frozen=True)
class RulerSources:
    """Paths of the user's files (None: not given)."""
    essay: Optional[str] = None
    squad: Optional[str] = None
    hotpotqa: Optional[str] = None

    def path(self, what: str, task: str) -> str:
        path = getattr(self, what)
        if not path:
            raise DatasetMissingError(f"RULER task {task} needs the {what} file ({HOW_TO_GET[what]})")
        return path

    def essay_words(self, task: str) -> List[str]:
        return read_essay(self.path("essay", task))

    def qa(self, dataset: str, task: str) -> QaData:
        path = self.path(dataset, task)
        data = read_squad(path) if dataset == "squad" else read_hotpotqa(path)
        if not data.questions:
            raise DatasetMissingError(f"{path} holds no answerable questions")
        return data
