"""The built-in default's bilingual sample: a synthetic three-class sentiment task.

    python -m flare.default.sample      # rewrites flare/default/toy_sentiment.jsonl (deterministic)

English sentences come from a small grammar ("the soup was really delicious today and we paid in
cash"); the label is the sentiment of the adjective (negative / neutral / positive, NusaX's classes).
Each example also exists in one of two invented languages, "qaa" and "qab" (ISO 639 reserves
qaa-qtz for local use):

* words are replaced through a fixed lexicon of made-up words (seeded), with different word order
  (qaa: noun, time, adjective, verb; qab: the clause reversed);
* each sentiment adjective has two target-language synonyms, drawn per example, so the target text
  is sparser than the English one: the English source stream is the easier signal, which is the
  situation FLARE is for.

The English sentence of every row is its source column (standing in for a machine translation).
Splits: train 384 (192 per toy language; the English sides are stage 1's data), validation 32 and
test 96 per language. The task is learnable by construction: one word decides the label.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SAMPLE_PATH = Path(__file__).with_name("toy_sentiment.jsonl")
LANGUAGES = ("qaa", "qab")
SPLITS = {"train": 384, "validation": 64, "test": 192}
SEED = 2025

NOUNS = (
    "food",
    "hotel",
    "movie",
    "service",
    "room",
    "coffee",
    "teacher",
    "bus",
    "park",
    "book",
    "music",
    "staff",
    "beach",
    "market",
    "train",
    "soup",
)
VERBS = ("was", "is", "seemed", "looked")
INTENSIFIERS = ("", "really", "quite", "very")
ADJECTIVES = {
    0: ("terrible", "awful", "horrible", "dirty", "rude", "boring"),
    1: ("ordinary", "average", "normal", "acceptable", "typical", "standard"),
    2: ("great", "wonderful", "excellent", "lovely", "perfect", "pleasant"),
}
TIMES = ("", "today", "yesterday", "this morning", "last week")
FILLERS = ("", "and we paid in cash", "and it was near the station", "and we stayed two days", "and my friend came too")

_CONSONANTS = "bdfghklmnprstvz"
_VOWELS = "aeiou"


def _lexicon(rng: random.Random, words: list[str], synonyms: set[str], taken: set[str]) -> dict[str, list[str]]:
    """Made-up word(s) for each English word: two for sentiment adjectives, one otherwise."""
    out = {}
    for w in words:
        forms = []
        while len(forms) < (2 if w in synonyms else 1):
            n = rng.choice((2, 2, 3))
            cand = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(n))
            if cand not in taken:
                taken.add(cand)
                forms.append(cand)
        out[w] = forms
    return out


def _vocabulary() -> list[str]:
    words = ["the"] + list(NOUNS) + list(VERBS)
    for group in (INTENSIFIERS, TIMES, FILLERS):
        words += [w for phrase in group for w in phrase.split()]
    words += [a for group in ADJECTIVES.values() for a in group]
    return list(dict.fromkeys(words))


def _translate(parts: dict, lang: str, lex: dict, rng: random.Random) -> str:
    def tr(phrase: str) -> list[str]:
        return [rng.choice(lex[w]) for w in phrase.split()]

    noun, verb, adj = tr("the " + parts["noun"]), tr(parts["verb"]), tr(parts["intens"] + " " + parts["adj"])
    time, filler = tr(parts["time"]), tr(parts["filler"])
    if lang == "qaa":
        words = noun + time + adj + verb + filler
    else:
        words = list(reversed(noun + verb + adj + time)) + filler
    return " ".join(words)


def generate() -> list[dict]:
    """All rows of the sample (deterministic)."""
    rng = random.Random(SEED)
    taken = set(_vocabulary())
    adjectives = {a for group in ADJECTIVES.values() for a in group}
    lexicons = {lang: _lexicon(rng, _vocabulary(), adjectives, taken) for lang in LANGUAGES}
    rows, seen = [], set()
    for split, count in SPLITS.items():
        i = 0
        while i < count:
            label = rng.randrange(3)
            parts = {
                "noun": rng.choice(NOUNS),
                "verb": rng.choice(VERBS),
                "intens": rng.choice(INTENSIFIERS),
                "adj": rng.choice(ADJECTIVES[label]),
                "time": rng.choice(TIMES),
                "filler": rng.choice(FILLERS),
            }
            english = " ".join(
                w
                for w in (
                    "the",
                    parts["noun"],
                    parts["verb"],
                    parts["intens"],
                    parts["adj"],
                    parts["time"],
                    parts["filler"],
                )
                if w
            )
            if english in seen:  # no sentence in two splits (or twice in one)
                continue
            seen.add(english)
            lang = LANGUAGES[i % len(LANGUAGES)]
            rows.append(
                {
                    "id": f"{split}-{i:04d}",
                    "split": split,
                    "lang": lang,
                    "text": _translate(parts, lang, lexicons[lang], rng),
                    "label": label,
                    "source_text": english,
                }
            )
            i += 1
    return rows


def load_sample(split: str, *, english: bool = False, path: Path = SAMPLE_PATH) -> list[dict]:
    """Classification rows of one split. english=True gives the English sides (stage 1's data)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["split"] != split:
                continue
            text = r["source_text"] if english else r["text"]
            rows.append(
                {
                    "id": r["id"],
                    "lang": "en" if english else r["lang"],
                    "text": text,
                    "text_pair": None,
                    "label": r["label"],
                    "source_text": r["source_text"],
                    "source_text_pair": None,
                }
            )
    return rows


def main() -> None:
    with open(SAMPLE_PATH, "w", encoding="utf-8") as f:
        for row in generate():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {SAMPLE_PATH}")


if __name__ == "__main__":
    main()
