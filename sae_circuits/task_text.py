"""Fill the IOI and subject-verb-agreement templates of `tasks/` deterministically from a seed.

Pure Python (no torch): the built-in tasks (`tasks.py`), the corpus (`corpus.py`) and the build of the
embedded model (`embedded/`) all read their prompts from here.
Names, SVA nouns and verbs are filled with a leading space (" Mary", " keys", " is"), and the
embedded tokenizer makes each of them one token, so clean and corrupted prompts have equal length.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

from sae_circuits.errors import UserInputError
from sae_circuits.resources import asset_dir

SPLITS = ("train", "heldout")
ORDERS = ("ABBA", "BABA")
_NAME_SLOTS = ("{A}", "{B}", "{S}", "{IO}")


@cache
def load_task_data(name: str) -> dict[str, Any]:
    """Return the parsed `tasks/<name>.json` ("ioi" or "sva")."""
    path = asset_dir("tasks") / f"{name}.json"
    if not path.is_file():
        raise UserInputError(f"task data not found: {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserInputError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


def ioi_templates(split: str) -> list[dict[str, str]]:
    """The IOI templates of a split, each `{"id", "text"}`; checks the slot conventions."""
    _check_split(split)
    templates = load_task_data("ioi")["templates"][split]
    for t in templates:
        text = t["text"]
        if any(text.count(slot) != 1 for slot in _NAME_SLOTS):
            raise ValueError(f"IOI template {t['id']} needs each of {_NAME_SLOTS} exactly once")
        if text.index("{IO}") < max(text.index(s) for s in ("{A}", "{B}", "{S}")):
            raise ValueError(f"IOI template {t['id']}: {{IO}} must be the last name slot")
        if re.search(r"(?<! )\{(A|B|S|IO)\}", text):
            raise ValueError(f"IOI template {t['id']}: every name slot must follow a space")
    return templates


def single_token_words() -> list[str]:
    """Words (with leading space) that must be single tokens: names, SVA nouns and verbs."""
    ioi, sva = load_task_data("ioi"), load_task_data("sva")
    words = [" " + n for n in ioi["names"]]
    words += [" " + n[k] for n in sva["nouns"] for k in ("singular", "plural")]
    words += [" " + v[k] for v in sva["verbs"] for k in ("singular", "plural")]
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class IOIExample:
    """One IOI prompt. Names are stored without the leading space; answer tokens are " " + name.

    `prompt` ends just before the answer; `abc_prompt` is the same template with the second subject
    mention replaced by a third name `c` (three distinct names, same token length), so neither `io`
    nor `s` is singled out; `swap_prompt` swaps `io` and `s` everywhere (the answer becomes `s`).
    """

    prompt: str
    io: str
    s: str
    c: str
    template_id: str
    order: str
    abc_prompt: str
    swap_prompt: str
    text: str  # the full clean sentence, answer and ending included

    @property
    def answer(self) -> str:
        return " " + self.io

    @property
    def distractor(self) -> str:
        return " " + self.s

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def fill_ioi(
    template: dict[str, str], order: str, io: str, s: str, s2: str, place: str, obj: str
) -> tuple[str, str]:
    """Fill one IOI template; return (prompt up to the answer, full sentence). `s2` fills {S}."""
    a, b = (io, s) if order == "ABBA" else (s, io)
    full = template["text"].format(A=a, B=b, S=s2, IO=io, place=place, object=obj)
    cut = template["text"].format(A=a, B=b, S=s2, IO="\x00", place=place, object=obj)
    prompt = cut[: cut.index(" \x00")]
    return prompt, full


def ioi_examples(split: str = "heldout", n: int = 100, seed: int = 0) -> list[IOIExample]:
    """`n` IOI examples cycling over the split's templates, orders balanced (ABBA, BABA)."""
    _check_split(split)
    if n < 0:
        raise UserInputError(f"n must be >= 0, got {n}")
    data = load_task_data("ioi")
    templates = ioi_templates(split)
    rng = random.Random(f"ioi-{split}-{seed}")
    out = []
    for i in range(n):
        template = templates[i % len(templates)]
        order = ORDERS[(i // len(templates)) % 2]
        io, s, c = rng.sample(data["names"], 3)
        place, obj = rng.choice(data["places"]), rng.choice(data["objects"])
        prompt, text = fill_ioi(template, order, io, s, s, place, obj)
        abc, _ = fill_ioi(template, order, io, s, c, place, obj)
        swap, _ = fill_ioi(template, order, s, io, io, place, obj)
        out.append(IOIExample(prompt, io, s, c, template["id"], order, abc, swap, text))
    return out


def ioi_sentence(rng: random.Random, split: str = "train", abc: bool = False) -> str:
    """One random full IOI sentence for the corpus. With `abc`, {S} is a third name and the
    answer is either of the first two names at random (the sentence is then ambiguous)."""
    data = load_task_data("ioi")
    template = rng.choice(ioi_templates(split))
    order = rng.choice(ORDERS)
    io, s, c = rng.sample(data["names"], 3)
    place, obj = rng.choice(data["places"]), rng.choice(data["objects"])
    if abc:
        a, b = (io, s) if order == "ABBA" else (s, io)
        return template["text"].format(
            A=a, B=b, S=c, IO=rng.choice((io, s)), place=place, object=obj
        )
    return fill_ioi(template, order, io, s, s, place, obj)[1]


@dataclass(frozen=True)
class SVAExample:
    """One agreement prompt: `prompt` ends before the verb; `correct`/`wrong` carry a leading space.

    `corrupt_prompt` flips the subject's number (same token length), so its right verb is `wrong`.
    """

    prompt: str
    correct: str
    wrong: str
    subject: str
    distractor: str
    number: str  # "singular" or "plural" (of the subject)
    template_id: str
    verb_id: str
    corrupt_prompt: str
    text: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def sva_templates(split: str) -> list[dict[str, str]]:
    """The SVA templates of a split, each `{"id", "text"}`."""
    _check_split(split)
    templates = load_task_data("sva")["templates"][split]
    for t in templates:
        if not t["text"].startswith("The {subj}") or t["text"].count("{dist}") != 1:
            raise ValueError(
                f"SVA template {t['id']} must start with 'The {{subj}}' and hold one {{dist}}"
            )
    return templates


def _sva_item(
    rng: random.Random, template: dict[str, str], number: str, dist_number: str
) -> SVAExample:
    data = load_task_data("sva")
    subj, dist = rng.sample(data["nouns"], 2)
    verb = rng.choice(data["verbs"])
    other = "plural" if number == "singular" else "singular"
    prompt = template["text"].format(subj=subj[number], dist=dist[dist_number])
    corrupt = template["text"].format(subj=subj[other], dist=dist[dist_number])
    correct, wrong = " " + verb[number], " " + verb[other]
    text = f"{prompt}{correct} {rng.choice(verb['endings'])}."
    return SVAExample(
        prompt,
        correct,
        wrong,
        subj[number],
        dist[dist_number],
        number,
        template["id"],
        verb["id"],
        corrupt,
        text,
    )


def sva_examples(split: str = "heldout", n: int = 100, seed: int = 0) -> list[SVAExample]:
    """`n` agreement prompts whose distractor noun has the other number, numbers balanced."""
    _check_split(split)
    if n < 0:
        raise UserInputError(f"n must be >= 0, got {n}")
    templates = sva_templates(split)
    rng = random.Random(f"sva-{split}-{seed}")
    out = []
    for i in range(n):
        number = ("singular", "plural")[i % 2]
        other = "plural" if number == "singular" else "singular"
        out.append(_sva_item(rng, templates[(i // 2) % len(templates)], number, other))
    return out


def sva_sentence(rng: random.Random, split: str = "train", p_attractor: float = 0.5) -> str:
    """One random agreement sentence for the corpus; the distractor has the other number with
    probability `p_attractor`, otherwise the same number."""
    number = rng.choice(("singular", "plural"))
    other = "plural" if number == "singular" else "singular"
    dist_number = other if rng.random() < p_attractor else number
    return _sva_item(rng, rng.choice(sva_templates(split)), number, dist_number).text
