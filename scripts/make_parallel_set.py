"""Write moekit/data/builtin/parallel.{en,de}: short English-German sentence pairs composed from templates.

The pairs are the offline default of ``moekit train --task translate`` and ``moekit demo --task translate``.
Every German phrase below was written for this set (nouns with their gender, adjective endings after
ein-/der-words, dative places), so the output is deterministic and public domain (CC0). Run from the
repository root: ``python scripts/make_parallel_set.py``.
"""

from __future__ import annotations

import random
from pathlib import Path

# English noun, German singular, German plural, gender (m/f/n)
PEOPLE = [
    ("man", "Mann", "Männer", "m"),
    ("woman", "Frau", "Frauen", "f"),
    ("boy", "Junge", "Jungen", "m"),
    ("girl", "Mädchen", "Mädchen", "n"),
    ("child", "Kind", "Kinder", "n"),
    ("student", "Student", "Studenten", "m"),
]
ANIMALS = [
    ("dog", "Hund", "Hunde", "m"),
    ("cat", "Katze", "Katzen", "f"),
    ("horse", "Pferd", "Pferde", "n"),
]
# English adjective, German stem (endings are added by case and gender)
ADJECTIVES = [
    ("young", "jung"),
    ("little", "klein"),
    ("tall", "groß"),
    ("old", "alt"),
    ("happy", "glücklich"),
    ("tired", "müd"),
]
# English -ing form, German 3rd person singular, plural
INTRANSITIVE = [
    ("running", "läuft", "laufen"),
    ("sitting", "sitzt", "sitzen"),
    ("standing", "steht", "stehen"),
    ("playing", "spielt", "spielen"),
    ("sleeping", "schläft", "schlafen"),
    ("waiting", "wartet", "warten"),
    ("jumping", "springt", "springen"),
]
PLACES = [
    ("in the park", "im Park"),
    ("on the beach", "am Strand"),
    ("in the snow", "im Schnee"),
    ("on the street", "auf der Straße"),
    ("in front of the house", "vor dem Haus"),
    ("in the water", "im Wasser"),
    ("on the grass", "auf dem Rasen"),
    ("next to the car", "neben dem Auto"),
]
# Transitive verbs (people only): English -ing, German singular, plural, objects (English, German accusative)
TRANSITIVE = [
    (
        "reading",
        "liest",
        "lesen",
        [("a book", "ein Buch"), ("a newspaper", "eine Zeitung"), ("a letter", "einen Brief")],
    ),
    ("holding", "hält", "halten", [("a ball", "einen Ball"), ("a flower", "eine Blume"), ("a cup", "eine Tasse")]),
    (
        "carrying",
        "trägt",
        "tragen",
        [("a bag", "eine Tasche"), ("a box", "eine Kiste"), ("an umbrella", "einen Regenschirm")],
    ),
    (
        "eating",
        "isst",
        "essen",
        [("an apple", "einen Apfel"), ("a sandwich", "ein Sandwich"), ("a banana", "eine Banane")],
    ),
    ("throwing", "wirft", "werfen", [("a ball", "einen Ball"), ("a stone", "einen Stein")]),
]
COLOURS = [
    ("red", "rot"),
    ("blue", "blau"),
    ("green", "grün"),
    ("black", "schwarz"),
    ("white", "weiß"),
    ("yellow", "gelb"),
]
# English garment, German dative phrase start (preposition + article), German noun
CLOTHES = [
    ("in a {c} shirt", "in einem {c}en Hemd"),
    ("in a {c} jacket", "in einer {c}en Jacke"),
    ("in a {c} dress", "in einem {c}en Kleid"),
    ("with a {c} hat", "mit einem {c}en Hut"),
]
NUMBERS = [("Two", "Zwei"), ("Three", "Drei")]

INDEF = {"m": ("Ein", "er"), "f": ("Eine", "e"), "n": ("Ein", "es")}
DEF = {"m": "Der", "f": "Die", "n": "Das"}


def article_en(word: str) -> str:
    return "An" if word[0] in "aeiou" else "A"


def singular(rng: random.Random) -> tuple[str, str]:
    """'A tall man is running in the park.' / 'The old cat is sleeping on the grass.'"""
    en_noun, de_noun, _, g = rng.choice(PEOPLE + ANIMALS)
    en_adj, de_adj = rng.choice(ADJECTIVES)
    verb_en, verb_de, _ = rng.choice(INTRANSITIVE)
    place_en, place_de = rng.choice(PLACES)
    if rng.random() < 0.5:
        art, ending = INDEF[g]
        en = f"{article_en(en_adj)} {en_adj} {en_noun} is {verb_en} {place_en}."
        de = f"{art} {de_adj}{ending} {de_noun} {verb_de} {place_de}."
    else:
        en = f"The {en_adj} {en_noun} is {verb_en} {place_en}."
        de = f"{DEF[g]} {de_adj}e {de_noun} {verb_de} {place_de}."
    return en, de


def plural(rng: random.Random) -> tuple[str, str]:
    """'Two little dogs are playing in the snow.'"""
    en_noun, _, de_plural, _ = rng.choice(PEOPLE + ANIMALS)
    en_noun = {"man": "men", "woman": "women", "child": "children"}.get(en_noun, en_noun + "s")
    en_adj, de_adj = rng.choice(ADJECTIVES)
    verb_en, _, verb_de = rng.choice(INTRANSITIVE)
    place_en, place_de = rng.choice(PLACES)
    num_en, num_de = rng.choice(NUMBERS)
    return (
        f"{num_en} {en_adj} {en_noun} are {verb_en} {place_en}.",
        f"{num_de} {de_adj}e {de_plural} {verb_de} {place_de}.",
    )


def dressed(rng: random.Random) -> tuple[str, str]:
    """'A woman in a red jacket is reading a book.'"""
    en_noun, de_noun, _, g = rng.choice(PEOPLE)
    colour_en, colour_de = rng.choice(COLOURS)
    clothes_en, clothes_de = rng.choice(CLOTHES)
    verb_en, verb_de, _, objects = rng.choice(TRANSITIVE)
    obj_en, obj_de = rng.choice(objects)
    art = INDEF[g][0]
    en = f"{article_en(en_noun)} {en_noun} {clothes_en.format(c=colour_en)} is {verb_en} {obj_en}."
    de = f"{art} {de_noun} {clothes_de.format(c=colour_de)} {verb_de} {obj_de}."
    return en, de


def group_action(rng: random.Random) -> tuple[str, str]:
    """'Three children are eating an apple in the park.'"""
    en_noun, _, de_plural, _ = rng.choice(PEOPLE)
    en_noun = {"man": "men", "woman": "women", "child": "children"}.get(en_noun, en_noun + "s")
    verb_en, _, verb_de, objects = rng.choice(TRANSITIVE)
    obj_en, obj_de = rng.choice(objects)
    place_en, place_de = rng.choice(PLACES)
    num_en, num_de = rng.choice(NUMBERS)
    return (
        f"{num_en} {en_noun} are {verb_en} {obj_en} {place_en}.",
        f"{num_de} {de_plural} {verb_de} {place_de} {obj_de}.",
    )


def main(n: int = 480, seed: int = 0) -> None:
    rng = random.Random(seed)
    makers = [singular, singular, plural, dressed, group_action]
    pairs, seen = [], set()
    while len(pairs) < n:
        en, de = rng.choice(makers)(rng)
        if en not in seen:
            seen.add(en)
            pairs.append((en, de))
    out = Path(__file__).resolve().parent.parent / "moekit" / "data" / "builtin"
    (out / "parallel.en").write_text("".join(en + "\n" for en, _ in pairs), encoding="utf-8")
    (out / "parallel.de").write_text("".join(de + "\n" for _, de in pairs), encoding="utf-8")
    print(f"wrote {len(pairs)} pairs to {out}/parallel.{{en,de}}")


if __name__ == "__main__":
    main()
