"""A generative grammar of IOI and subject-verb-agreement sentences, with held-out shapes.

A sentence is built slot by slot from productions; the tuple of productions used is its **shape**
(e.g. IOI `("names_first", "one", "plain", "give", "the")`). Every shape that the rules allow is a
training shape except those listed in `IOI_HELDOUT_SHAPES` / `SVA_HELDOUT_SHAPES` (and, for IOI,
every shape using a production marked held-out-only, such as `met`), so held-out sentences come from
compositions of productions, or productions, that the training corpus never uses.

The grammar renders *templates*, strings in the format of `task_text` (name slots `{A}`, `{B}`,
`{S}`, `{IO}`, filler slots `{place}`, `{object}`, `{thing}`; SVA: `{subj}`, `{dist}`, `{dist2}`),
so clean and corrupted prompts are filled from the same template and keep the same token length.
Pure Python; every choice comes from the `random.Random` passed in.
"""

from __future__ import annotations

import itertools
import random
from functools import cache

# --- IOI -------------------------------------------------------------------------------------

CONJUNCTIONS = ("When", "After", "While", "Before", "As", "Once", "Because", "Since", "As soon as")
ADVERBS = (
    "Then", "Afterwards", "Later", "Yesterday", "One day", "In the morning", "That evening",
    "On Sunday", "Last week", "Earlier", "Today", "At noon", "After lunch", "In the end",
)  # fmt: skip
EVENTS = (
    "went to the {place}", "arrived at the {place}", "were working at the {place}",
    "had a lot of fun at the {place}", "met at the {place}", "walked to the {place}",
    "were waiting at the {place}", "spent the day at the {place}", "came back from the {place}",
    "got to the {place}", "were talking at the {place}", "visited the {place}",
    "left the {place}", "were sitting in the {place}", "had lunch at the {place}",
    "were shopping at the {place}", "drove to the {place}", "stayed at the {place}",
    "cleaned the {place}", "were resting at the {place}",
)  # fmt: skip
ACTIVITIES = (
    "were talking", "were working", "had lunch", "met", "sat down", "were waiting",
    "played a game", "talked for a while", "were reading", "cooked dinner", "had a long argument",
    "were laughing", "danced",
)  # fmt: skip
PLACE_OPENINGS = ("At the {place}", "In the {place}", "Outside the {place}", "Near the {place}")
RELATIVE_VERBS = ("visited", "liked", "went to", "cleaned", "found", "chose", "left")
ADJECTIVES = ("busy", "quiet", "crowded", "small", "warm", "new", "empty", "noisy")
MEETINGS = (
    "{A} met {B} at the {place}.", "{A} was with {B} at the {place}.",
    "{A} ran into {B} near the {place}.", "{A} visited {B} at the {place}.",
)  # fmt: skip
SHORT_SENTENCES = (
    "It was a sunny day.", "It was raining.", "The {place} was busy.", "They were happy.",
    "Everyone was tired.", "It was getting late.", "The music was loud.",
    "They talked for a while.", "Nobody else was there.", "It was very cold.",
    "The day was long.", "They were hungry.",
)  # fmt: skip
MAIN_CLAUSES = (
    "they were happy", "it started to rain", "they sat down", "they were very tired",
    "it was late", "they felt hungry", "the sun came out", "they stopped for a while",
)  # fmt: skip
LEADS = {
    "plain": ("{S}",),
    "then": ("Then {S}", "Then, {S}", "So {S}", "Next, {S}"),
    "later": ("Later, {S}", "After a while, {S}", "Soon {S}", "Afterwards {S}", "In the end, {S}"),
}
GIVE_VERBS = (
    "gave", "handed", "passed", "sent", "threw", "offered", "lent", "sold", "showed", "brought",
    "returned", "delivered", "mailed", "tossed", "gave back",
)  # fmt: skip
MODALS = ("decided to", "wanted to", "tried to", "was going to", "had to", "promised to")
GIVE_BASES = ("give", "hand", "pass", "send", "throw", "show", "lend", "sell", "bring", "return")
FOR_VERBS = (
    "bought", "made", "got", "found", "picked up", "saved", "kept", "wrapped", "fixed", "chose",
)  # fmt: skip
TALK_PHRASES = (
    "said hello to", "talked to", "spoke to", "waved at", "smiled at", "whispered to",
    "shouted at", "wrote a letter to", "read a story to", "told a joke to", "said goodbye to",
    "apologized to", "called out to", "sang a song to", "listened to", "looked at", "nodded to",
    "laughed with", "sat next to", "walked over to",
)  # fmt: skip
POSSESSIVES = ("their", "my", "our")

IOI_SLOTS = ("intro", "between", "lead", "act", "object")
IOI_PRODUCTIONS: dict[str, tuple[str, ...]] = {
    "intro": ("clause", "adverb", "names_first", "place_first", "relative", "met"),
    "between": ("none", "one", "two"),
    "lead": tuple(LEADS),
    "act": ("give", "modal", "for", "talk"),
    "object": ("a", "the", "poss", "none"),
}
IOI_HELDOUT_ONLY = {"intro": ("met",)}  # productions no training sentence uses
IOI_HELDOUT_SHAPES: tuple[tuple[str, ...], ...] = (
    ("names_first", "none", "plain", "give", "a"),
    ("names_first", "one", "plain", "give", "the"),
    ("place_first", "none", "then", "give", "the"),
    ("adverb", "one", "plain", "for", "a"),
    ("clause", "none", "plain", "talk", "none"),
    ("relative", "two", "later", "modal", "poss"),
    ("clause", "one", "plain", "give", "poss"),
    ("met", "one", "then", "give", "a"),
)


def _valid_ioi(shape: tuple[str, ...]) -> bool:
    intro, between, lead, act, obj = shape
    if (act == "talk") != (obj == "none"):
        return False
    return not (intro == "clause" and between == "none" and lead != "plain")


@cache
def ioi_shapes(split: str) -> tuple[tuple[str, ...], ...]:
    """The IOI shapes of a split ("train" or "heldout"), in a fixed order."""
    if split == "heldout":
        return IOI_HELDOUT_SHAPES
    held = set(IOI_HELDOUT_SHAPES)
    return tuple(
        shape
        for shape in itertools.product(*(IOI_PRODUCTIONS[s] for s in IOI_SLOTS))
        if _valid_ioi(shape)
        and shape not in held
        and not any(shape[IOI_SLOTS.index(s)] in p for s, p in IOI_HELDOUT_ONLY.items())
    )


def _intro(rng: random.Random, kind: str, between: str) -> str:
    event = rng.choice(EVENTS)
    if kind == "clause":
        head = f"{rng.choice(CONJUNCTIONS)} {{A}} and {{B}} {event},"
        return head if between == "none" else f"{head} {rng.choice(MAIN_CLAUSES)}."
    if kind == "adverb":
        return f"{rng.choice(ADVERBS)}, {{A}} and {{B}} {event}."
    if kind == "names_first":
        return f"{{A}} and {{B}} {event}."
    if kind == "place_first":
        return f"{rng.choice(PLACE_OPENINGS)}, {{A}} and {{B}} {rng.choice(ACTIVITIES)}."
    if kind == "relative":
        verb, adjective = rng.choice(RELATIVE_VERBS), rng.choice(ADJECTIVES)
        return f"The {{place}} that {{A}} and {{B}} {verb} was {adjective}."
    if kind == "met":
        return rng.choice(MEETINGS)
    raise ValueError(f"unknown IOI intro {kind!r}")


def _object(rng: random.Random, kind: str) -> str:
    if kind == "a":
        return "{object}"
    if kind == "the":
        return "the {thing}"
    return f"{rng.choice(POSSESSIVES)} {{thing}}"


def _act(rng: random.Random, kind: str, obj: str) -> str:
    if kind == "give":
        return f"{rng.choice(GIVE_VERBS)} {_object(rng, obj)} to {{IO}}."
    if kind == "modal":
        return f"{rng.choice(MODALS)} {rng.choice(GIVE_BASES)} {_object(rng, obj)} to {{IO}}."
    if kind == "for":
        return f"{rng.choice(FOR_VERBS)} {_object(rng, obj)} for {{IO}}."
    if kind == "talk":
        return f"{rng.choice(TALK_PHRASES)} {{IO}}."
    raise ValueError(f"unknown IOI act {kind!r}")


def ioi_template(rng: random.Random, shape: tuple[str, ...]) -> str:
    """Render one IOI template of `shape` (slots `{A}`, `{B}`, `{S}`, `{IO}`, fillers)."""
    intro, between, lead, act, obj = shape
    n_between = IOI_PRODUCTIONS["between"].index(between)
    first = 1 if intro == "clause" and n_between else 0  # the clause carries one main clause
    parts = [_intro(rng, intro, between)]
    parts += rng.sample(SHORT_SENTENCES, n_between - first)
    parts.append(f"{rng.choice(LEADS[lead])} {_act(rng, act, obj)}")
    return " ".join(parts)


# --- subject-verb agreement ------------------------------------------------------------------

PREPOSITIONS = (
    "near", "to", "behind", "on", "next to", "with", "beside", "under", "above", "from", "of",
    "by", "for", "opposite", "along", "against", "past", "like", "among", "around", "beyond",
    "below", "toward", "on top of", "at the back of", "in the middle of", "away from",
    "across from", "inside", "in front of", "close to", "without", "near one of",
)  # fmt: skip
RELATIVE_PAST = (
    "liked", "saw", "wanted", "bought", "moved", "cleaned", "kept", "used", "made", "took",
    "carried", "fixed", "opened", "chose", "needed", "brought", "sold", "built", "found",
    "painted", "remembered",
)  # fmt: skip
SUBJECT_RELATIVES = ("stood", "lay", "sat", "fell", "waited", "stayed", "hung")
SVA_CONTEXTS = {
    "none": ("The {subj}",),
    "place": ("In the kitchen, the {subj}", "At the shop, the {subj}", "Inside the hall, the {subj}",
              "Out in the garden, the {subj}", "Today the {subj}"),
    "clause": ("I think that the {subj}", "She said that the {subj}", "We know that the {subj}",
               "He told me that the {subj}", "It seems that the {subj}"),
}  # fmt: skip
SVA_ADJECTIVES = ("old", "new", "small", "big", "red", "blue", "wooden", "heavy")

SVA_SLOTS = ("context", "adjective", "modifier", "second")
SVA_PRODUCTIONS: dict[str, tuple[str, ...]] = {
    "context": tuple(SVA_CONTEXTS),
    "adjective": ("none", "adjective"),
    "modifier": ("pp", "relative", "subject_relative"),
    "second": ("none", "pp", "relative"),
}
SVA_HELDOUT_SHAPES: tuple[tuple[str, ...], ...] = (
    ("place", "none", "relative", "none"),
    ("clause", "adjective", "pp", "none"),
    ("none", "adjective", "subject_relative", "pp"),
    ("none", "none", "pp", "relative"),
    ("clause", "none", "relative", "pp"),
    ("place", "adjective", "pp", "pp"),
)


@cache
def sva_shapes(split: str) -> tuple[tuple[str, ...], ...]:
    """The SVA shapes of a split ("train" or "heldout"), in a fixed order."""
    if split == "heldout":
        return SVA_HELDOUT_SHAPES
    held = set(SVA_HELDOUT_SHAPES)
    every = itertools.product(*(SVA_PRODUCTIONS[s] for s in SVA_SLOTS))
    return tuple(shape for shape in every if shape not in held)


def _modifier(rng: random.Random, kind: str, slot: str) -> str:
    if kind == "pp":
        return f"{rng.choice(PREPOSITIONS)} the {slot}"
    if kind == "relative":
        return f"{rng.choice(('that', 'which'))} the {slot} {rng.choice(RELATIVE_PAST)}"
    if kind == "subject_relative":
        return f"that {rng.choice(SUBJECT_RELATIVES)} {rng.choice(PREPOSITIONS)} the {slot}"
    raise ValueError(f"unknown SVA modifier {kind!r}")


def sva_template(rng: random.Random, shape: tuple[str, ...]) -> str:
    """Render one SVA prompt template of `shape`: ends just before the verb; holds `{subj}`,
    `{dist}` and, with a second modifier, `{dist2}`."""
    context, adjective, modifier, second = shape
    head = rng.choice(SVA_CONTEXTS[context])
    if adjective == "adjective":
        head = head.replace("{subj}", f"{rng.choice(SVA_ADJECTIVES)} {{subj}}")
    parts = [head, _modifier(rng, modifier, "{dist}")]
    if second != "none":
        parts.append(_modifier(rng, second, "{dist2}"))
    return " ".join(parts)


def shape_id(shape: tuple[str, ...]) -> str:
    """The text name of a shape, e.g. "names_first/one/plain/give/the"."""
    return "/".join(shape)
