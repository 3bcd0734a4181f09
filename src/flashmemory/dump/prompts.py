"""Long training prompts for the dump pass: the model decodes over these and its attention is recorded.

Every prompt is one user message built from the local sources of ``flashmemory.dump.sources``. The kinds make
the model look far back in different ways, which is what the Memory Indexer has to learn to predict:

* ``keyed_fact``: key/value records planted at random depths among hard distractors with similar keys;
* ``multi_hop``: two- or three-step chains whose links lie far apart;
* ``multi_turn``: a transcript of chat sessions where personal details are given early and changed later;
* ``code_qa``: concatenated stdlib source files and a question about one function in the middle (via ``ast``);
* ``continuation``: one long document (or a few) to continue or summarise.

The vocabularies and sentence templates here are deliberately unlike the evaluation's planted fact
("The access code of the {thing} in {city} is {number}.") so the indexer is not trained on the test template.
"""

from __future__ import annotations

import ast
import functools
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .sources import SourceDocument, debian_doc_documents, split_documents, stdlib_source_documents

PROMPT_KINDS = ("keyed_fact", "multi_hop", "multi_turn", "code_qa", "continuation")
# Kinds built only when named, so that "all" keeps giving the prompts that recorded dumps were made from.
EXTRA_KINDS = ("copy_back",)
SPLITS = ("train", "validation")

# Sizes of the pieces that documents are cut into: big enough to keep a paragraph or a small function whole,
# small enough that a planted fact can land almost anywhere.
_BLOCK_MIN_CHARS = 200
_BLOCK_MAX_CHARS = 2000
_EXCERPT_CHARS = (2000, 12000)
# How close to the drawn length a prompt must come before we stop re-fitting it (the brief allows ~5%).
_LENGTH_TOLERANCE = 0.015
_FIT_ROUNDS = 5


@dataclass(frozen=True, slots=True)
class TrainPrompt:
    """One training prompt.

    ``text`` is the whole user message; ``answer`` is the expected answer where the kind has one (for a
    continuation it is the text that really follows, when there is any), else None. ``answer_prefix`` starts the
    model's answer (after the chat template's generation prompt), as RULER's answer prefixes do.
    """

    text: str
    kind: str
    doc_ids: tuple[str, ...]
    answer: str | None
    answer_prefix: str = ""


def training_prompts(
    tokenizer: Callable[..., Mapping[str, Any]],
    *,
    num_prompts: int,
    min_tokens: int,
    max_tokens: int,
    seed: int,
    split: str = "train",
    kinds: tuple[str, ...] = PROMPT_KINDS,
) -> list[TrainPrompt]:
    """Build ``num_prompts`` long prompts, as evenly spread over ``kinds`` as the count allows.

    Args:
        tokenizer: anything called as ``tokenizer(text, add_special_tokens=False)`` that returns a mapping
            with ``"input_ids"`` (a Hugging Face tokenizer, or a test stand-in); lengths are counted with it.
        num_prompts: how many prompts.
        min_tokens: the shortest prompt length to draw, in tokens of ``tokenizer``.
        max_tokens: the longest; each prompt's target length is uniform in ``[min_tokens, max_tokens]`` and is
            met to within a few percent (a target shorter than a kind's fixed text is overshot).
        seed: the same seed gives the same prompts, in the same order.
        split: ``"train"`` or ``"validation"``: the side of ``split_documents`` the documents come from.
        kinds: which of ``PROMPT_KINDS`` to build.

    Returns:
        The prompts, in a seed-determined order of kinds.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    unknown = [k for k in kinds if k not in _BUILDERS]
    if not kinds or unknown:
        raise ValueError(f"kinds must be a non-empty subset of {PROMPT_KINDS + EXTRA_KINDS}, got {kinds!r}")
    if num_prompts < 0 or not 0 < min_tokens <= max_tokens:
        raise ValueError(f"need num_prompts >= 0 and 0 < min_tokens <= max_tokens, got "
                         f"{num_prompts}, {min_tokens}, {max_tokens}")  # fmt: skip
    pools = _pools(split)
    counter = _TokenCounter(tokenizer)
    rng = random.Random(seed)
    # A balanced, shuffled schedule: every kind appears as soon as num_prompts >= len(kinds).
    schedule = [kinds[i % len(kinds)] for i in range(num_prompts)]
    rng.shuffle(schedule)
    prompts = []
    for kind in schedule:
        target = rng.randint(min_tokens, max_tokens)
        # Each prompt draws from its own generator, so its content depends on the seed and its slot only.
        sub_rng = random.Random(rng.getrandbits(64))
        prompts.append(_BUILDERS[kind](sub_rng, pools, counter, target))
    return prompts


# --------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True, slots=True)
class _Pools:
    text: tuple[SourceDocument, ...]  # every document of the split
    groups: tuple[tuple[SourceDocument, ...], ...]  # the same, one group per source, for filler
    code: tuple[SourceDocument, ...]  # stdlib sources of the split, for code_qa


@functools.cache
def _pools(split: str) -> _Pools:
    stdlib = split_documents(stdlib_source_documents())
    debian = split_documents(debian_doc_documents())
    side = 0 if split == "train" else 1
    text = tuple(sorted(stdlib[side] + debian[side], key=lambda d: d.doc_id))
    if not text:
        raise RuntimeError("no source documents: the stdlib sources and /usr/share/doc are both empty")
    # Filler picks a source first, then a document: /usr/share/doc has five times as many documents, mostly
    # changelogs, and would otherwise crowd out the code.
    groups = tuple(tuple(part[side]) for part in (stdlib, debian) if part[side])
    return _Pools(text=text, groups=groups, code=tuple(stdlib[side]))


@functools.cache
def _blocks(doc: SourceDocument) -> tuple[str, ...]:
    """``doc`` cut at blank lines into pieces of about ``_BLOCK_MIN_CHARS``..``_BLOCK_MAX_CHARS``."""
    blocks: list[str] = []
    current = ""
    for para in doc.text.split("\n\n"):
        para = para.strip("\n")
        if not para.strip():
            continue
        for piece in _split_long(para, _BLOCK_MAX_CHARS):
            current = f"{current}\n\n{piece}" if current else piece
            if len(current) >= _BLOCK_MIN_CHARS:
                blocks.append(current)
                current = ""
    if current:
        blocks.append(current)
    return tuple(blocks)


def _split_long(text: str, max_chars: int) -> Iterator[str]:
    """``text`` in pieces of at most ``max_chars``, cut at line ends where there are any."""
    while len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars)
        if cut <= 0:
            cut = text.rfind(" ", 0, max_chars)
        if cut <= 0:
            cut = max_chars
        yield text[:cut].rstrip()
        text = text[cut:].lstrip("\n")
    if text.strip():
        yield text


class _TokenCounter:
    """Counts tokens of ``tokenizer``, remembering pieces (counted again each time a prompt is re-fitted)."""

    def __init__(self, tokenizer: Callable[..., Mapping[str, Any]], memo_limit: int = 200_000) -> None:
        self._tokenizer = tokenizer
        self._memo: dict[str, int] = {}
        self._memo_limit = memo_limit

    def __call__(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def piece(self, text: str) -> int:
        """Tokens of a piece of a prompt, plus one for the separator that joins it to the next."""
        n = self._memo.get(text)
        if n is None:
            n = self(text) + 1
            if len(self._memo) < self._memo_limit:
                self._memo[text] = n
        return n


def _excerpt_stream(
    rng: random.Random, groups: Sequence[Sequence[SourceDocument]], *, headers: bool = True
) -> Iterator[tuple[str, str]]:
    """Endless ``(doc_id, block)`` pairs: runs of consecutive blocks from random places of random documents.

    Args:
        rng: the only source of randomness, so the stream is a function of its seed.
        groups: documents by source; each run picks a source uniformly, then a document in it.
        headers: start each run with a ``--- doc_id ---`` line.
    """
    while True:
        docs = groups[rng.randrange(len(groups))]
        doc = docs[rng.randrange(len(docs))]
        blocks = _blocks(doc)
        start = rng.randrange(len(blocks))
        want = rng.randint(*_EXCERPT_CHARS)
        if headers:
            yield doc.doc_id, f"--- {doc.doc_id} ---"
        taken = 0
        for block in blocks[start:]:
            yield doc.doc_id, block
            taken += len(block)
            if taken >= want:
                break


def _take(stream: Iterator[tuple[str, str]], budget: int, counter: _TokenCounter) -> list[tuple[str, str]]:
    """Pieces of ``stream`` worth about ``budget`` tokens; the last one is cut to fit."""
    out: list[tuple[str, str]] = []
    used = 0
    while used < budget:
        doc_id, block = next(stream)
        n = counter.piece(block)
        if used + n > budget:
            cut = _cut_prefix(block, (budget - used) / n)
            if cut:
                out.append((doc_id, cut))
            break
        out.append((doc_id, block))
        used += n
    return out


def _cut_prefix(text: str, fraction: float) -> str:
    """About ``fraction`` of ``text`` from its start, ending at a line end or a space where there is one."""
    end = int(len(text) * fraction)
    if end <= 0:
        return ""
    cut = max(text.rfind("\n", 0, end), text.rfind(" ", 0, end))
    # Never end inside a word when a space is available, so a continuation's answer starts on a whole word.
    return text[: cut if cut > 0 else end].rstrip()


def _fit(render: Callable[[int], tuple[str, ...]], target: int, counter: _TokenCounter) -> tuple[str, ...]:
    """Render with the filler budget that makes the first element (the prompt) about ``target`` tokens.

    ``render(budget)`` must be deterministic in ``budget``; it returns the prompt text and whatever else the
    caller needs. Pieces are counted one by one, which differs a little from counting the joined text, so the
    budget is corrected by the measured error until it is within tolerance.
    """
    fixed = counter(render(0)[0])
    budget = max(0, target - fixed)
    best: tuple[int, tuple[str, ...]] | None = None
    for _ in range(_FIT_ROUNDS):
        out = render(budget)
        n = counter(out[0])
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), out)
        if abs(n - target) <= _LENGTH_TOLERANCE * target or (n > target and budget == 0):
            break
        budget = max(0, budget + target - n)
    assert best is not None
    return best[1]


def _doc_ids(pieces: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(doc_id for doc_id, _ in pieces))


def _insert_at_depths(blocks: list[str], planted: Sequence[tuple[float, str]]) -> list[str]:
    """``blocks`` with each ``(depth, text)`` put between blocks at that relative depth."""
    out = list(blocks)
    # From the deepest down, so earlier insertions do not shift the later positions.
    for depth, text in sorted(planted, key=lambda p: p[0], reverse=True):
        out.insert(round(depth * len(blocks)), text)
    return out


def _spread_depths(rng: random.Random, count: int, lo: float = 0.03, hi: float = 0.97) -> list[float]:
    """``count`` depths, one in each of ``count`` equal bands of ``[lo, hi]``, in random order."""
    width = (hi - lo) / count
    depths = [lo + (i + rng.uniform(0.1, 0.9)) * width for i in range(count)]
    rng.shuffle(depths)
    return depths


# --------------------------------------------------------------------------------------------- vocabularies

_ENTITIES = (
    "the copper kiln", "Pump Station Delta", "the night ferry", "Orchard Block 12", "the east turbine",
    "Depot Kestrel", "the survey drone", "the ward four freezer", "the brass chronometer", "Silo Juniper",
    "the tram depot", "Loom 9", "the relay mast", "the seed bank", "Hangar Beryl", "the water tower",
    "the mineral press", "Kiosk Tamarind", "the signal box", "Dock Heron", "the glass furnace", "Barge Wren",
    "the weather buoy", "Vault Sorrel", "the printing press", "Reservoir Finch", "the cable car",
    "the bell foundry", "Quarry Pell", "the grain elevator", "the pipe organ", "Ridge Beacon 3",
)  # fmt: skip
_FIRST_NAMES = (
    "Amara", "Bastian", "Céline", "Dario", "Eun-ji", "Farid", "Greta", "Hamish", "Ines", "Jonas", "Keiko",
    "Lucan", "Mireille", "Nikolai", "Oona", "Pavel", "Quentin", "Rasa", "Soren", "Tamsin", "Ugo", "Vesna",
    "Wilhelmina", "Xavi", "Yara", "Zeno", "Ottilie", "Marek", "Linnea", "Caspian",
)  # fmt: skip
_LAST_NAMES = (
    "Abernethy", "Bakshi", "Castellanos", "Dunmore", "Eriksen", "Fairweather", "Gallo", "Halvorsen",
    "Iwasaki", "Jovanovic", "Kowalczyk", "Lindgren", "Marchetti", "Nakamura", "Okonkwo", "Petrakis",
    "Quist", "Rosales", "Szabo", "Thorne", "Ueda", "Valdivia", "Whitlock", "Yilmaz", "Zeller",
)  # fmt: skip
_PLACES = (
    "Harrowgate", "Port Elspeth", "Lindqvist Bay", "Carrowmore", "Vellmar", "Ostraval", "Kilbrannan",
    "Saint Odile", "Marrowdale", "Tessaly Cove", "Brinmoor", "Quillon", "Drumlevan", "Everholm", "Fennick",
    "Gallowmere", "Hythebridge", "Isle of Corran", "Jarrowfield", "Kestrel Point", "Lowenna", "Norbrook",
)  # fmt: skip
_WORDS = (
    "amber", "basalt", "cinder", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "jasper", "kelp",
    "lichen", "mica", "nimbus", "onyx", "pollen", "quartz", "russet", "saffron", "tundra", "umber", "velvet",
    "willow", "zephyr", "cobalt", "sorrel", "thistle", "marble", "lantern", "meadow",
)  # fmt: skip
_COLOURS = (
    "teal", "ochre", "crimson", "slate grey", "lilac", "mustard yellow", "forest green", "navy blue",
    "burnt orange", "ivory", "maroon", "turquoise",
)  # fmt: skip
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)  # fmt: skip


def _name(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"


def _place(rng: random.Random) -> str:
    return rng.choice(_PLACES)


# Each attribute draws its own kind of value, so an answer is not always a number.
_ATTRIBUTES: tuple[tuple[str, Callable[[random.Random], str]], ...] = (
    ("calibration offset", lambda r: f"{r.randint(1, 99)}.{r.randint(0, 9)} millivolts"),
    ("rated load", lambda r: f"{r.randint(120, 9800)} kilograms"),
    ("shelf label", lambda r: f"{r.choice(_WORDS)}-{r.randint(10, 99)}"),
    ("duty supervisor", _name),
    ("paint colour", lambda r: f"{r.choice(_COLOURS)} with {r.choice(_COLOURS)} trim"),
    ("batch number", lambda r: f"B{r.randint(10000, 99999)}"),
    ("firmware version", lambda r: f"{r.randint(1, 9)}.{r.randint(0, 19)}.{r.randint(0, 40)}"),
    ("last inspection date", lambda r: f"{r.randint(1, 28)} {r.choice(_MONTHS)} {r.randint(1987, 2024)}"),
    ("mooring fee", lambda r: f"{r.randint(3, 950)} crowns"),
    ("home port", _place),
    ("password hint", lambda r: f"{r.choice(_WORDS)} {r.choice(_WORDS)}"),
    ("maximum speed", lambda r: f"{r.randint(4, 260)} kilometres per hour"),
)

_KEYED_TEMPLATES = (
    "Record {key}: the {attribute} of {entity} is {value}.",
    "Ledger entry {key} lists the {attribute} of {entity} as {value}.",
    "[{key}] {entity} | {attribute}: {value}",
    "Inventory item {key} notes that {entity} has {value} as its {attribute}.",
    "According to register line {key}, the {attribute} for {entity} is {value}.",
)
_KEYED_QUESTIONS = (
    "What is the {attribute} given in entry {key}?",
    "According to entry {key}, what is the {attribute} of {entity}?",
    "Find entry {key} in the text above. Which {attribute} does it record?",
)
_DOC_INTROS = (
    "Below is a long collection of excerpts from software documentation and source code. Records are "
    "scattered through it.",
    "Read the following material carefully; some notes have been inserted between the excerpts.",
    "The text below mixes documentation, changelogs and code with a number of inserted records.",
)
_ANSWER_STYLES = (
    "Answer with the value only.",
    "Give a short answer.",
    "Reply briefly, quoting the value exactly as written.",
)


def _key_prefix(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(rng.randint(2, 3)))


def _similar_key(rng: random.Random, key: str, taken: set[str]) -> str:
    """A key one small edit away from ``key``: a digit changed, two digits swapped or a letter changed."""
    prefix, digits = key.split("-")
    for _ in range(100):
        how = rng.randrange(3)
        d = list(digits)
        p = list(prefix)
        if how == 0:
            i = rng.randrange(len(d))
            d[i] = rng.choice([c for c in "0123456789" if c != d[i]])
        elif how == 1:
            i = rng.randrange(len(d) - 1)
            d[i], d[i + 1] = d[i + 1], d[i]
        else:
            i = rng.randrange(len(p))
            p[i] = rng.choice([c for c in "ABCDEFGHJKLMNPQRSTUVWXYZ" if c != p[i]])
        candidate = f"{''.join(p)}-{''.join(d)}"
        if candidate not in taken:
            return candidate
    return _fresh_key(rng, taken)


def _fresh_key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{_key_prefix(rng)}-{rng.randint(1000, 99999)}"
        if key not in taken:
            return key


def _distinct_values(rng: random.Random, make: Callable[[random.Random], str], taken: set[str]) -> str:
    for _ in range(200):
        value = make(rng)
        if value not in taken:
            taken.add(value)
            return value
    value = f"{make(rng)} ({len(taken)})"
    taken.add(value)
    return value


# ----------------------------------------------------------------------------------------------- keyed_fact


def _keyed_fact(rng: random.Random, pools: _Pools, counter: _TokenCounter, target: int) -> TrainPrompt:
    keys: set[str] = set()
    values: set[str] = set()
    attribute, make = rng.choice(_ATTRIBUTES)
    entity = rng.choice(_ENTITIES)
    target_key = _fresh_key(rng, keys)
    keys.add(target_key)
    facts = [(target_key, attribute, entity, _distinct_values(rng, make, values))]
    # Hard distractors: nearly the same key, and often the same entity and attribute, with another value.
    for _ in range(rng.randint(2, 5)):
        key = _similar_key(rng, target_key, keys)
        keys.add(key)
        other_entity = entity if rng.random() < 0.6 else rng.choice(_ENTITIES)
        facts.append((key, attribute, other_entity, _distinct_values(rng, make, values)))
    # Other records on other things, so the target is one of several facts rather than the only one.
    for _ in range(rng.randint(2, 6)):
        key = _fresh_key(rng, keys)
        keys.add(key)
        other_attribute, other_make = rng.choice(_ATTRIBUTES)
        facts.append((key, other_attribute, rng.choice(_ENTITIES), _distinct_values(rng, other_make, values)))
    planted = [
        (rng.uniform(0.02, 0.98), rng.choice(_KEYED_TEMPLATES).format(key=k, attribute=a, entity=e, value=v))
        for k, a, e, v in facts
    ]
    question = rng.choice(_KEYED_QUESTIONS).format(key=target_key, attribute=attribute, entity=entity)
    intro, style = rng.choice(_DOC_INTROS), rng.choice(_ANSWER_STYLES)
    filler_seed = rng.getrandbits(64)

    def render(budget: int) -> tuple[str, ...]:
        pieces = _take(_excerpt_stream(random.Random(filler_seed), pools.groups), budget, counter)
        body = "\n\n".join(_insert_at_depths([b for _, b in pieces], planted))
        text = f"{intro}\n\n{body}\n\nQuestion: {question} {style}"
        return text, *_doc_ids(pieces)

    text, *doc_ids = _fit(render, target, counter)
    return TrainPrompt(text=text, kind="keyed_fact", doc_ids=tuple(doc_ids), answer=facts[0][3])


# ------------------------------------------------------------------------------------------------ multi_hop

# (link sentence, value sentence, question) with {x} the start, {y} the middle, {v} the answer.
_HOP_SCHEMAS = (
    ("{x} was transferred to the {y} team last spring.",
     "The {y} team keeps all of its archives in {v}.",
     "In which place does the team that {x} was transferred to keep its archives?"),
    ("{x} ordered the replacement parts from the supplier {y}.",
     "Everything the supplier {y} sells is shipped from {v}.",
     "From where does the supplier that {x} ordered the replacement parts from ship its goods?"),
    ("{x} was mentored for three years by {y}.",
     "{y} was born and raised in {v}.",
     "Where was the person who mentored {x} born and raised?"),
    ("The prototype nicknamed {x} was assembled in workshop {y}.",
     "Workshop {y} is supervised by {v}.",
     "Who supervises the workshop where the prototype nicknamed {x} was assembled?"),
)  # fmt: skip
_TEAMS = (
    "Falcon", "Larch", "Quartz", "Meridian", "Osprey", "Tamarack", "Halcyon", "Basilisk", "Cormorant",
    "Sycamore", "Polaris", "Gannet", "Obsidian", "Wayfarer", "Kingfisher", "Saltmarsh",
)  # fmt: skip
_NICKNAMES = (
    "Blue Heron", "Tin Lark", "Old Faithful", "Moth", "Lodestar", "Little Anvil", "Sparrowhawk",
    "Paper Tiger", "Nightjar", "Cricket", "Iron Wren", "Goldcrest",
)  # fmt: skip


def _hop_slots(schema: int, rng: random.Random, used: set[str]) -> tuple[str, str, str]:
    """Fresh ``(x, y, v)`` for a schema; no string is used twice in one prompt."""

    def fresh(make: Callable[[random.Random], str]) -> str:
        return _distinct_values(rng, make, used)

    if schema == 0:
        return fresh(_name), fresh(lambda r: r.choice(_TEAMS)), fresh(_place)
    if schema == 1:
        return fresh(_name), fresh(lambda r: f"{r.choice(_LAST_NAMES)} & Sons"), fresh(_place)
    if schema == 2:
        return fresh(_name), fresh(_name), fresh(_place)
    workshop = fresh(lambda r: f"{r.choice(_WORDS).title()} {r.randint(2, 40)}")
    return fresh(lambda r: r.choice(_NICKNAMES)), workshop, fresh(_name)


def _multi_hop(rng: random.Random, pools: _Pools, counter: _TokenCounter, target: int) -> TrainPrompt:
    if rng.random() < 0.5:
        facts, question, answer = _entity_chain(rng)
    else:
        facts, question, answer = _record_chain(rng)
    intro, style = rng.choice(_DOC_INTROS), rng.choice(_ANSWER_STYLES)
    filler_seed = rng.getrandbits(64)

    def render(budget: int) -> tuple[str, ...]:
        pieces = _take(_excerpt_stream(random.Random(filler_seed), pools.groups), budget, counter)
        body = "\n\n".join(_insert_at_depths([b for _, b in pieces], facts))
        text = f"{intro}\n\n{body}\n\nQuestion: {question} {style}"
        return text, *_doc_ids(pieces)

    text, *doc_ids = _fit(render, target, counter)
    return TrainPrompt(text=text, kind="multi_hop", doc_ids=tuple(doc_ids), answer=answer)


def _entity_chain(rng: random.Random) -> tuple[list[tuple[float, str]], str, str]:
    """A two-hop chain in words (x -> y -> v) plus distractor chains of the same schema."""
    schema = rng.randrange(len(_HOP_SCHEMAS))
    link, value, question = _HOP_SCHEMAS[schema]
    used: set[str] = set()
    x, y, v = _hop_slots(schema, rng, used)
    link_depth, value_depth = _spread_depths(rng, 2)
    facts = [(link_depth, link.format(x=x, y=y)), (value_depth, value.format(y=y, v=v))]
    for _ in range(rng.randint(2, 4)):
        dx, dy, dv = _hop_slots(schema, rng, used)
        facts.append((rng.uniform(0.02, 0.98), link.format(x=dx, y=dy)))
        facts.append((rng.uniform(0.02, 0.98), value.format(y=dy, v=dv)))
    return facts, question.format(x=x), v


_REDIRECT = "Record {src} has been superseded; its contents now live under record {dst}."
_HOLDS = "Record {key}: the {attribute} of {entity} is {value}."


def _record_chain(rng: random.Random) -> tuple[list[tuple[float, str]], str, str]:
    """Records that redirect to other records (one or two redirects) before the one that holds the value."""
    keys: set[str] = set()
    values: set[str] = set()
    attribute, make = rng.choice(_ATTRIBUTES)
    entity = rng.choice(_ENTITIES)
    hops = rng.randint(2, 3)
    chain = []
    for _ in range(hops):
        chain.append(_fresh_key(rng, keys))
        keys.add(chain[-1])
    answer = _distinct_values(rng, make, values)
    depths = _spread_depths(rng, hops)
    facts = [(depths[i], _REDIRECT.format(src=chain[i], dst=chain[i + 1])) for i in range(hops - 1)]
    facts.append((depths[-1], _HOLDS.format(key=chain[-1], attribute=attribute, entity=entity, value=answer)))
    # Distractors: redirects out of keys that look like the start, and records with the same attribute.
    for _ in range(rng.randint(2, 4)):
        src = _similar_key(rng, chain[0], keys)
        dst = _fresh_key(rng, keys | {src})
        keys |= {src, dst}
        value = _distinct_values(rng, make, values)
        facts.append((rng.uniform(0.02, 0.98), _REDIRECT.format(src=src, dst=dst)))
        holds = _HOLDS.format(key=dst, attribute=attribute, entity=entity, value=value)
        facts.append((rng.uniform(0.02, 0.98), holds))
    question = (
        f"Start at record {chain[0]} and follow where its contents were moved, as many times as needed. "
        f"What {attribute} does the record you end at give for {entity}?"
    )
    return facts, question, answer


# ----------------------------------------------------------------------------------------------- multi_turn

# (slot, how the question names it, first mention, later update or None) with {v} the value.
_DETAILS = (
    ("dog", "my dog's name", "By the way, my dog is called {v}.",
     "Small news: we decided to rename our dog, he answers to {v} now."),
    ("employer", "the company I work for", "I work as an analyst at {v}.",
     "I changed jobs last week; I'm at {v} now."),
    ("town", "the town I live in", "I live in {v}, if that matters for the examples.",
     "We finally moved house, so I live in {v} now."),
    ("car", "the car I drive", "I drive an old {v}, for what it's worth.",
     "I sold my old car and bought a new {v}."),
    ("hobby", "my main hobby", "Outside work my main hobby is {v}.",
     "I've dropped my old hobby and taken up {v} instead."),
    ("friend", "my best friend's name", "My best friend {v} is visiting this weekend.", None),
    ("allergy", "the food I'm allergic to", "Please remember I'm allergic to {v}.",
     "Correction on my allergy: the tests say it's actually {v}, not what I told you before."),
    ("team", "the football club I support", "I've supported {v} since I was a kid.",
     "Confession: I've switched allegiance and now support {v}."),
)  # fmt: skip
_DETAIL_VALUES: dict[str, Callable[[random.Random], str]] = {
    "dog": lambda r: r.choice(("Pepper", "Biscuit", "Nimbus", "Otto", "Juniper", "Waffles", "Bramble", "Kobe",
                               "Pickle", "Saffron", "Tofu", "Moose")),
    "employer": lambda r: f"{r.choice(_LAST_NAMES)} {r.choice(('Logistics', 'Foods', 'Optics', 'Works'))}",
    "town": _place,
    "car": lambda r: f"{r.choice(_COLOURS)} {r.choice(('hatchback', 'estate', 'pickup', 'coupe', 'van'))}",
    "hobby": lambda r: r.choice(("bouldering", "pottery", "birdwatching", "fencing", "beekeeping", "origami",
                                 "sea kayaking", "chess problems", "bookbinding", "salsa dancing")),
    "friend": lambda r: r.choice(_FIRST_NAMES),
    "allergy": lambda r: r.choice(("hazelnuts", "shellfish", "sesame", "kiwi", "celery", "mustard", "lupin")),
    "team": lambda r: f"{r.choice(_PLACES)} {r.choice(('Rovers', 'Athletic', 'United', 'Wanderers'))}",
}  # fmt: skip
_USER_OPENERS = (
    "Can you help me make sense of this passage?",
    "I'm reading some documentation. What is this part about?",
    "Here's something from a project I'm looking at:",
    "Could you explain the following?",
    "What do you make of this?",
    "Another excerpt, please walk me through it:",
)
_ASSISTANT_OPENERS = (
    "Sure. The most relevant part to compare it with is this:",
    "Here is the passage I would read next to it:",
    "Good question. This related excerpt explains the context:",
    "Let me quote the part that matters:",
    "Here is how the surrounding material puts it:",
)
_ACKS = ("Thanks for telling me, I'll keep that in mind.", "Noted.", "Got it, I'll remember that.",
         "Understood, thanks for the update.")  # fmt: skip


def _multi_turn(rng: random.Random, pools: _Pools, counter: _TokenCounter, target: int) -> TrainPrompt:
    sessions = rng.randint(3, 8)
    early = max(1, sessions // 2)
    details = rng.sample(_DETAILS, rng.randint(2, 4))
    # (session, position within session, user turn text); a slot's update always comes in a later session.
    mentions: list[tuple[int, float, str]] = []
    facts: dict[str, tuple[int, str, int | None, str | None]] = {}
    for slot, _, first, update in details:
        first_value = _DETAIL_VALUES[slot](rng)
        first_session = rng.randrange(early)
        mentions.append((first_session, rng.random(), first.format(v=first_value)))
        new_session, new_value = None, None
        if update is not None and rng.random() < 0.7:
            new_session = rng.randrange(max(first_session + 1, early), sessions)
            new_value = first_value
            while new_value == first_value:
                new_value = _DETAIL_VALUES[slot](rng)
            mentions.append((new_session, rng.random(), update.format(v=new_value)))
        facts[slot] = (first_session, first_value, new_session, new_value)
    slot, desc, _, _ = rng.choice(details)
    first_session, first_value, new_session, new_value = facts[slot]
    if new_value is None:
        question = f"Back in session {first_session + 1} I mentioned {desc}. What was it?"
        answer = first_value
    elif rng.random() < 0.5:
        question = f"Going by everything I've told you across our sessions, what is {desc} now?"
        answer = new_value
    else:
        question = (f"In session {first_session + 1} I told you {desc}, and it changed later. "
                    f"What was it originally, before the change?")  # fmt: skip
        answer = first_value
    # Roughly even sessions, so none is left empty by two close cuts.
    cuts = [(i + rng.uniform(-0.3, 0.3)) / sessions for i in range(1, sessions)]
    dates = sorted(rng.sample(range(1, 360), sessions))
    year = rng.randint(2019, 2024)
    filler_seed, wrap_seed = rng.getrandbits(64), rng.getrandbits(64)

    def render(budget: int) -> tuple[str, ...]:
        stream = _excerpt_stream(random.Random(filler_seed), pools.groups, headers=False)
        pieces = _take(stream, budget, counter)
        wrap = random.Random(wrap_seed)
        bounds = [0] + [round(c * len(pieces)) for c in cuts] + [len(pieces)]
        lines = []
        for s in range(sessions):
            month, day = divmod(dates[s] - 1, 30)
            lines.append(f"=== Session {s + 1} ({year}-{month + 1:02d}-{min(day + 1, 28):02d}) ===")
            blocks = [b for _, b in pieces[bounds[s] : bounds[s + 1]]]
            # Whole exchanges, so that a planted detail never splits a question from its reply.
            exchanges = []
            for i in range(0, len(blocks), 2):
                user = f"User: {wrap.choice(_USER_OPENERS)}\n\n{blocks[i]}"
                if i + 1 < len(blocks):
                    reply = f"Assistant: {wrap.choice(_ASSISTANT_OPENERS)}\n\n{blocks[i + 1]}"
                else:
                    reply = "Assistant: I will need a moment to go through that; let's pick it up next time."
                exchanges.append(f"{user}\n\n{reply}")
            planted = [(pos, f"User: {text}\n\nAssistant: {_ACKS[int(pos * 1000) % len(_ACKS)]}")
                       for sess, pos, text in mentions if sess == s]  # fmt: skip
            lines.extend(_insert_at_depths(exchanges, planted) or ["User: Hello again.\n\nAssistant: Hello!"])
        transcript = "\n\n".join(lines)
        text = (f"Here is the transcript of our earlier chat sessions.\n\n{transcript}\n\n"
                f"=== Session {sessions + 1} (today) ===\nUser: {question}\n\n"
                "Answer my last message using what was said in the earlier sessions.")  # fmt: skip
        return text, *_doc_ids(pieces)

    text, *doc_ids = _fit(render, target, counter)
    return TrainPrompt(text=text, kind="multi_turn", doc_ids=tuple(doc_ids), answer=answer)


# -------------------------------------------------------------------------------------------------- code_qa


@dataclass(frozen=True, slots=True)
class _FunctionInfo:
    qualname: str
    lineno: int  # of the ``def`` line (1-based)
    end_lineno: int
    params: str
    doc_first_line: str | None


@functools.cache
def _functions(doc: SourceDocument) -> tuple[_FunctionInfo, ...]:
    """Module-level functions and methods of module-level classes of a source file."""
    try:
        tree = ast.parse(doc.text)
    except (SyntaxError, ValueError):
        return ()
    out = []
    for node in tree.body:
        scopes = [("", node)]
        if isinstance(node, ast.ClassDef):
            scopes = [(f"{node.name}.", child) for child in node.body]
        for prefix, fn in scopes:
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and fn.end_lineno is not None:
                doc_text = ast.get_docstring(fn)
                first = doc_text.strip().split("\n")[0].strip() if doc_text else None
                out.append(_FunctionInfo(prefix + fn.name, fn.lineno, fn.end_lineno, _param_list(fn.args),
                                         first if first and len(first) >= 15 else None))  # fmt: skip
    return tuple(out)


def _param_list(args: ast.arguments) -> str:
    names = [a.arg for a in args.posonlyargs + args.args]
    if args.vararg is not None:
        names.append("*" + args.vararg.arg)
    elif args.kwonlyargs:
        names.append("*")
    names += [a.arg for a in args.kwonlyargs]
    if args.kwarg is not None:
        names.append("**" + args.kwarg.arg)
    return ", ".join(names) if names else "no parameters"


def _code_stream(rng: random.Random, docs: Sequence[SourceDocument]) -> Iterator[SourceDocument]:
    """Source files in random order, each once before any repeats."""
    while True:
        order = list(docs)
        rng.shuffle(order)
        yield from order


def _code_qa(rng: random.Random, pools: _Pools, counter: _TokenCounter, target: int) -> TrainPrompt:
    if not pools.code:
        raise RuntimeError("no stdlib source documents in this split for code_qa")
    stream_seed = rng.getrandbits(64)
    question_kind = rng.choice(("params", "params", "file", "docstring"))
    pick = rng.random()  # which candidate, as a fraction, so the choice is stable across re-fits
    style = rng.choice(("", " Answer briefly.", " Be precise."))

    def render(budget: int) -> tuple[str, ...]:
        stream = _code_stream(random.Random(stream_seed), pools.code)
        files: list[tuple[SourceDocument, str]] = []  # (document, the part of its text shown)
        used = 0
        while used < budget:
            doc = next(stream)
            header = f"# ===== File: {doc.doc_id} ====="
            n = counter.piece(doc.text) + counter.piece(header)
            if used + n > budget:
                shown = _cut_lines(doc.text, (budget - used) / n)
                if shown:
                    files.append((doc, shown))
                break
            files.append((doc, doc.text))
            used += n
        return _code_prompt(files, question_kind, pick, style)

    text, answer, *doc_ids = _fit(render, target, counter)
    return TrainPrompt(text=text, kind="code_qa", doc_ids=tuple(doc_ids), answer=answer)


def _cut_lines(text: str, fraction: float) -> str:
    end = text.rfind("\n", 0, int(len(text) * fraction))
    return text[: end + 1] if end > 0 else ""


def _code_prompt(
    files: Sequence[tuple[SourceDocument, str]], question_kind: str, pick: float, style: str
) -> tuple[str, ...]:
    """The prompt text, its answer and the doc_ids, for files shown in this order."""
    parts, offsets, total = [], [], 0
    for doc, shown in files:
        part = f"# ===== File: {doc.doc_id} =====\n{shown}"
        offsets.append(total + len(part) - len(shown))
        parts.append(part)
        total += len(part) + 2
    body = "\n\n".join(parts)
    # A name defined twice (same file shown twice, or the same method name in two files) would be ambiguous.
    counts: dict[str, int] = {}
    for doc, _ in files:
        for fn in _functions(doc):
            counts[fn.qualname] = counts.get(fn.qualname, 0) + 1
    candidates: list[tuple[float, SourceDocument, _FunctionInfo]] = []
    for (doc, shown), offset in zip(files, offsets, strict=True):
        shown_lines = shown.count("\n") + (0 if shown.endswith("\n") else 1)
        line_starts = None
        for fn in _functions(doc):
            if counts[fn.qualname] != 1 or fn.end_lineno > shown_lines:
                continue
            if question_kind == "docstring" and fn.doc_first_line is None:
                continue
            if line_starts is None:
                line_starts = _line_starts(shown)
            candidates.append(((offset + line_starts[fn.lineno - 1]) / max(1, len(body)), doc, fn))
    middle = [c for c in candidates if 0.2 <= c[0] <= 0.8] or candidates
    doc_ids = tuple(dict.fromkeys(doc.doc_id for doc, _ in files))
    if question_kind == "file" and len(doc_ids) < 2:
        question_kind = "params"  # with one file shown, "which file" gives itself away
    if not middle:
        first = files[0][0].doc_id if files else "(none)"
        question = "What is the path of the first file shown above?"
        return f"{body}\n\nQuestion about the code above: {question}{style}", first, *doc_ids
    _, doc, fn = middle[min(len(middle) - 1, int(pick * len(middle)))]
    what = "method" if "." in fn.qualname else "function"
    if question_kind == "params":
        question = (f"What are the parameters of the {what} `{fn.qualname}` in the code above? "
                    "List their names in order.")  # fmt: skip
        answer = fn.params
    elif question_kind == "file":
        question = f"In which file of the code above is the {what} `{fn.qualname}` defined?"
        answer = doc.doc_id
    else:
        question = f"What does the first line of the docstring of the {what} `{fn.qualname}` above say?"
        answer = fn.doc_first_line or ""
    return f"{body}\n\nQuestion about the code above: {question}{style}", answer, *doc_ids


def _line_starts(text: str) -> list[int]:
    starts, pos = [0], 0
    for line in text.split("\n"):
        pos += len(line) + 1
        starts.append(pos)
    return starts


# --------------------------------------------------------------------------------------------- continuation

_CONTINUE_INSTRUCTIONS = (
    ("Continue the text above from exactly where it stops, in the same style.", True),
    ("Write the next part of this document.", True),
    ("Summarise the document above in a few paragraphs.", False),
    ("What are the main topics covered in the text above? Give a structured summary.", False),
)


def _continuation(rng: random.Random, pools: _Pools, counter: _TokenCounter, target: int) -> TrainPrompt:
    # Rough characters per token of this tokenizer, to prefer documents long enough to fill the prompt alone.
    sample = pools.text[rng.randrange(len(pools.text))]
    head = sample.text[:4000]
    chars_per_token = len(head) / max(1, counter(head))
    need = target * chars_per_token * 1.1
    long_docs = [d for d in pools.text if len(d.text) >= need]
    first = rng.choice(long_docs) if long_docs else rng.choice(pools.text)
    start_fraction = rng.random()
    instruction, wants_continuation = rng.choice(_CONTINUE_INSTRUCTIONS)
    rest_seed = rng.getrandbits(64)

    def render(budget: int) -> tuple[str, ...]:
        # Start inside the first document, late enough that it still fills the budget where it can.
        blocks = _blocks(first)
        spare = max(0, len(first.text) - need)
        start = _block_index_at(blocks, start_fraction * spare)
        pieces: list[tuple[str, str]] = []
        following: str | None = None
        used = 0
        rest = random.Random(rest_seed)
        doc, index, header = first, start, True
        while used < budget:
            if index >= len(blocks):
                # The document ran out: go on with another one, marked by a header.
                doc = pools.text[rest.randrange(len(pools.text))]
                blocks, index, header = _blocks(doc), 0, True
                continue
            if header:
                pieces.append((doc.doc_id, f"--- {doc.doc_id} ---"))
                used += counter.piece(pieces[-1][1])
                header = False
            block = blocks[index]
            n = counter.piece(block)
            if used + n > budget:
                cut = _cut_prefix(block, (budget - used) / n)
                if cut:
                    pieces.append((doc.doc_id, cut))
                following = block[len(cut) :]
                break
            pieces.append((doc.doc_id, block))
            used += n
            index += 1
        if following is None and index < len(blocks):
            following = blocks[index]
        elif following is not None and index + 1 < len(blocks):
            following = f"{following}\n\n{blocks[index + 1]}"
        following = following.strip()[:1000] if following else None
        body = "\n\n".join(b for _, b in pieces)
        text = f"{body}\n\n{instruction}"
        return text, following or "", *_doc_ids(pieces)

    text, following, *doc_ids = _fit(render, target, counter)
    answer = following if wants_continuation and following else None
    return TrainPrompt(text=text, kind="continuation", doc_ids=tuple(doc_ids), answer=answer)


def _block_index_at(blocks: Sequence[str], chars: float) -> int:
    pos = 0
    for i, block in enumerate(blocks):
        if pos >= chars:
            return i
        pos += len(block) + 2
    return max(0, len(blocks) - 1)


# ------------------------------------------------------------------------------------------------ copy_back

_COPY_INSTRUCTIONS = (
    'Repeat, word for word, the passage above that begins "{cue}".',
    'Copy out the passage starting with "{cue}" exactly as it appears in the text above.',
    'Quote the section that opens with "{cue}" verbatim, from its first word on.',
    'Write out again, unchanged, the part of the document that begins "{cue}".',
)


def _copy_back(rng: random.Random, pools: _Pools, counter: _TokenCounter, target: int) -> TrainPrompt:
    # A passage planted early and asked for back word for word: while the answer is written, the tokens it reads
    # move through the passage's chunks in order, so a dump's lookahead labels follow a copy across cycles.
    docs = pools.groups[rng.randrange(len(pools.groups))]
    source = docs[rng.randrange(len(docs))]
    blocks = _blocks(source)
    start = rng.randrange(len(blocks))
    passage = "\n\n".join(blocks[start : start + rng.randint(1, 3)])
    # The answer starts with the passage's own first eight words, whitespace and all. The instruction quotes only
    # four: quoting all eight gives a copying model a second place to continue from, the instruction itself.
    words = list(re.finditer(r"\S+", passage))
    cue = passage[: words[min(7, len(words) - 1)].end()]
    instruction = rng.choice(_COPY_INSTRUCTIONS).format(cue=" ".join(w.group() for w in words[:4]))
    depth = rng.uniform(0.05, 0.6)
    filler_seed = rng.getrandbits(64)

    def render(budget: int) -> tuple[str, ...]:
        pieces = _take(_excerpt_stream(random.Random(filler_seed), pools.groups), budget, counter)
        body = "\n\n".join(_insert_at_depths([b for _, b in pieces], [(depth, passage)]))
        return f"{body}\n\n{instruction}", *_doc_ids([(source.doc_id, passage), *pieces])

    text, *doc_ids = _fit(render, target, counter)
    # the answer starts with the cue, so that even a small model that would not follow the instruction copies on
    return TrainPrompt(text=text, kind="copy_back", doc_ids=tuple(doc_ids), answer=passage, answer_prefix=cue)


_BUILDERS: dict[str, Callable[[random.Random, _Pools, _TokenCounter, int], TrainPrompt]] = {
    "keyed_fact": _keyed_fact,
    "multi_hop": _multi_hop,
    "multi_turn": _multi_turn,
    "code_qa": _code_qa,
    "continuation": _continuation,
    "copy_back": _copy_back,
}
