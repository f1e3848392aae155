"""IOI and subject-verb-agreement prompts, deterministic for a seed, from the grammar's templates.

Pure Python (no torch): the built-in tasks (`tasks.py`), the corpus (`corpus.py`) and the build of the
embedded model (`embedded/`) all read their prompts from here. Templates are rendered by
`sae_circuits.grammar` (train split: training shapes; heldout split: held-out shapes) and filled with
the names, places, objects, nouns and verbs of `tasks/`.
Names, SVA nouns and verbs are filled with a leading space (" Mary", " keys", " is"; a name may also
open the sentence), and the embedded tokenizer makes each of them one token, so clean and corrupted
prompts have equal length.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

from sae_circuits.errors import UserInputError
from sae_circuits.grammar import ioi_shapes, ioi_template, shape_id, sva_shapes, sva_template
from sae_circuits.resources import asset_dir

SPLITS = ("train", "heldout")
ORDERS = ("ABBA", "BABA")
_NAME_SLOTS = ("{A}", "{B}", "{S}", "{IO}")
# how many fixed templates the built-in tasks use per split (few enough that each template gets
# several prompts: mean ablation averages over the prompts of one template)
TEMPLATE_COUNTS = {"ioi": {"train": 48, "heldout": 24}, "sva": {"train": 48, "heldout": 24}}


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


def _check_ioi_template(template_id: str, text: str) -> None:
    if any(text.count(slot) != 1 for slot in _NAME_SLOTS):
        raise ValueError(f"IOI template {template_id} needs each of {_NAME_SLOTS} exactly once")
    if text.index("{IO}") < max(text.index(s) for s in ("{A}", "{B}", "{S}")):
        raise ValueError(f"IOI template {template_id}: {{IO}} must be the last name slot")
    if re.search(r"(?<=\S)\{(A|B|S|IO)\}", text):
        raise ValueError(f"IOI template {template_id}: every name slot must follow a space")


def _template_shapes(
    task: str, split: str, shapes: tuple[tuple[str, ...], ...]
) -> list[tuple[int, tuple[str, ...]]]:
    """(k, shape) of each fixed template: the shapes taking turns (k-th rendering of a shape), or,
    when there are more shapes than templates, a fixed sample of the shapes."""
    count = TEMPLATE_COUNTS[task][split]
    if count < len(shapes):
        return [(0, s) for s in random.Random(f"{task}-{split}-shapes").sample(shapes, count)]
    return [(i // len(shapes), shapes[i % len(shapes)]) for i in range(count)]


@cache
def ioi_templates(split: str) -> tuple[dict[str, str], ...]:
    """The fixed IOI templates of a split, each `{"id", "text", "shape"}` (`TEMPLATE_COUNTS`):
    every held-out shape in turn; a fixed sample of the training shapes."""
    _check_split(split)
    out = []
    for k, shape in _template_shapes("ioi", split, ioi_shapes(split)):
        rng = random.Random(f"ioi-template-{split}-{shape_id(shape)}-{k}")
        text = ioi_template(rng, shape)
        template_id = f"ioi_{split}_{len(out):03d}"
        _check_ioi_template(template_id, text)
        out.append({"id": template_id, "text": text, "shape": shape_id(shape)})
    return tuple(out)


def single_token_words() -> list[str]:
    """Words (with leading space) that must be single tokens: names, SVA nouns and verbs."""
    ioi, sva = load_task_data("ioi"), load_task_data("sva")
    words = [" " + n for n in ioi["names"]] + list(ioi["names"])  # a name may open a sentence
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
    shape: str  # the grammar shape of the template

    @property
    def answer(self) -> str:
        return " " + self.io

    @property
    def distractor(self) -> str:
        return " " + self.s

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def fill_ioi(
    text: str,
    order: str,
    io: str,
    s: str,
    s2: str,
    place: str,
    obj: str,
    answer: str | None = None,
) -> tuple[str, str]:
    """Fill one IOI template text; return (prompt up to the answer, full sentence). `s2` fills
    {S}, `answer` (default `io`) fills {IO}; `obj` is an object with its article ("a drink"),
    {thing} gets its bare noun."""
    a, b = (io, s) if order == "ABBA" else (s, io)
    fillers = {"A": a, "B": b, "S": s2, "place": place, "object": obj, "thing": obj.split(" ")[-1]}
    full = text.format(IO=io if answer is None else answer, **fillers)
    cut = text.format(IO="\x00", **fillers)
    prompt = cut[: cut.index(" \x00")]
    return prompt, full


def ioi_examples(split: str = "heldout", n: int = 100, seed: int = 0) -> list[IOIExample]:
    """`n` IOI examples cycling over the split's templates (so over its shapes), each template in
    both orders (ABBA, BABA) in turn."""
    _check_split(split)
    if n < 0:
        raise UserInputError(f"n must be >= 0, got {n}")
    data = load_task_data("ioi")
    templates = ioi_templates(split)
    rng = random.Random(f"ioi-{split}-{seed}")
    out = []
    for i in range(n):
        template = templates[(i // 2) % len(templates)]
        order = ORDERS[(i + i // (2 * len(templates))) % 2]
        io, s, c = rng.sample(data["names"], 3)
        place, obj = rng.choice(data["places"]), rng.choice(data["objects"])
        text = template["text"]
        prompt, full = fill_ioi(text, order, io, s, s, place, obj)
        abc, _ = fill_ioi(text, order, io, s, c, place, obj)
        swap, _ = fill_ioi(text, order, s, io, io, place, obj)
        out.append(
            IOIExample(prompt, io, s, c, template["id"], order, abc, swap, full, template["shape"])
        )
    return out


def ioi_sentence(rng: random.Random, split: str = "train", abc: bool = False) -> str:
    """One random full IOI sentence for the corpus, freshly rendered from a random shape of the
    split. With `abc`, {S} is a third name and the answer is either of the first two names at
    random (the sentence is then ambiguous)."""
    data = load_task_data("ioi")
    text = ioi_template(rng, rng.choice(ioi_shapes(split)))
    order = rng.choice(ORDERS)
    io, s, c = rng.sample(data["names"], 3)
    place, obj = rng.choice(data["places"]), rng.choice(data["objects"])
    if abc:
        return fill_ioi(text, order, io, s, c, place, obj, answer=rng.choice((io, s)))[1]
    return fill_ioi(text, order, io, s, s, place, obj)[1]


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
    shape: str  # the grammar shape of the template

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _other(number: str) -> str:
    return "plural" if number == "singular" else "singular"


@cache
def sva_templates(split: str) -> tuple[dict[str, str], ...]:
    """The fixed SVA templates of a split, each `{"id", "text", "shape"}` (`TEMPLATE_COUNTS`),
    the shapes of the split taking turns."""
    _check_split(split)
    out = []
    for k, shape in _template_shapes("sva", split, sva_shapes(split)):
        rng = random.Random(f"sva-template-{split}-{shape_id(shape)}-{k}")
        text = sva_template(rng, shape)
        template_id = f"sva_{split}_{len(out):03d}"
        if text.count("{subj}") != 1 or text.count("{dist}") != 1:
            raise ValueError(f"SVA template {template_id} needs one {{subj}} and one {{dist}}")
        out.append({"id": template_id, "text": text, "shape": shape_id(shape)})
    return tuple(out)


def _sva_item(
    rng: random.Random, template: dict[str, str], number: str, dist_numbers: tuple[str, str]
) -> SVAExample:
    """Fill `template`; `dist_numbers` are the numbers of {dist} and {dist2}."""
    data = load_task_data("sva")
    subj, dist, dist2 = rng.sample(data["nouns"], 3)
    verb = rng.choice(data["verbs"])
    other = _other(number)
    fillers = {"dist": dist[dist_numbers[0]], "dist2": dist2[dist_numbers[1]]}
    prompt = template["text"].format(subj=subj[number], **fillers)
    corrupt = template["text"].format(subj=subj[other], **fillers)
    correct, wrong = " " + verb[number], " " + verb[other]
    text = f"{prompt}{correct} {rng.choice(verb['endings'])}."
    return SVAExample(
        prompt,
        correct,
        wrong,
        subj[number],
        dist[dist_numbers[0]],
        number,
        template["id"],
        verb["id"],
        corrupt,
        text,
        template["shape"],
    )


def sva_examples(split: str = "heldout", n: int = 100, seed: int = 0) -> list[SVAExample]:
    """`n` agreement prompts whose distractor nouns all have the other number, numbers balanced,
    cycling over the split's templates (so over its shapes)."""
    _check_split(split)
    if n < 0:
        raise UserInputError(f"n must be >= 0, got {n}")
    templates = sva_templates(split)
    rng = random.Random(f"sva-{split}-{seed}")
    out = []
    for i in range(n):
        number = ("singular", "plural")[i % 2]
        other = _other(number)
        out.append(_sva_item(rng, templates[(i // 2) % len(templates)], number, (other, other)))
    return out


def sva_sentence(rng: random.Random, split: str = "train", p_attractor: float = 0.5) -> str:
    """One random agreement sentence for the corpus, freshly rendered from a random shape of the
    split; each distractor has the other number with probability `p_attractor`."""
    number = rng.choice(("singular", "plural"))
    dist_numbers = tuple(_other(number) if rng.random() < p_attractor else number for _ in "ab")
    shape = rng.choice(sva_shapes(split))
    template = {"id": "corpus", "text": sva_template(rng, shape), "shape": shape_id(shape)}
    return _sva_item(rng, template, number, dist_numbers).text
