"""Local LongMemEval-style items: long, timestamped chat histories with planted personal facts.

One generator per ability, each returning an item of LongMemEval's published shape:

* ``information_extraction``: one fact the user told (``single-session-user``) or a suggestion the assistant made
  (``single-session-assistant``), asked back later;
* ``multi_session``: quantities told in 2-4 sessions, asked as a total;
* ``knowledge_update``: a value told, then changed in a later session; the current value is asked;
* ``temporal_reasoning``: dated events; the days since one, or between two, are asked;
* ``abstention``: a fact like those above is told, and a similar one that was never told is asked.

The rest of each history is chat about the documentation of the standard library's evaluation modules
(:func:`flashmemory.bench.longbench.sources.doc_entries`), text the indexer's training prompts never use; the facts'
vocabulary is likewise unlike the training generator's. An item is a function of its seed string and its size
(the number of filler exchanges), so the runner can grow the history until it fills a token budget.
"""

from __future__ import annotations

import datetime as dt
import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..longbench.sources import doc_entries
from .format import MemItem

# ---------------------------------------------------------------------------------------------- vocabulary

_ACTIVITIES = ("life drawing", "swing dance", "woodworking", "improv theatre", "glassblowing", "jazz piano",
               "calligraphy", "stand-up paddling", "bread baking", "Portuguese")  # fmt: skip
_VENUES = ("the Larkspur Arts Centre", "Studio Halcyon", "the Mill Lane community hall", "Brightwater College",
           "the Copperleaf Studio", "Northgate Library", "the Old Tannery", "Quayside Workshop")  # fmt: skip
_RELATIVES = ("brother", "aunt", "grandfather", "niece", "cousin", "sister-in-law")
_GIFTS = ("a cast-iron waffle maker", "a telescope for beginners", "a set of watercolour pencils",
          "a leather-bound atlas", "a sourdough proofing basket", "a pair of trail running poles")  # fmt: skip
_BOOKS = ("The Salt Orchard", "A Map of Quiet Rivers", "Ninety Lanterns", "The Glass Almanac", "Winter at Pell Harbour",
          "The Clockmaker's Ledger")  # fmt: skip
_NEIGHBOURS = ("Priya", "Tobias", "Marguerite", "Kwame", "Ilse", "Rafferty", "Solveig", "Dmitri")
_THINGS_TO_NAME = ("sourdough starter", "rowing boat", "allotment blog", "book club", "vintage scooter")
_SUGGESTED_NAMES = ("Crumbsworth", "Marigold Drift", "The Turnip Times", "Chapter and Verse Society", "Vespa Verde",
                    "Old Yeast Faithful", "Puddle Jumper", "Pages & Pints")  # fmt: skip
_PLANTS = ("fiddle-leaf fig", "peace lily", "string-of-pearls", "bird of paradise", "jade plant")
_TALLIES = (  # (statement with {n}, question)
    ("I baked {n} loaves of bread for the school fair today.",
     "How many loaves of bread have I baked for the school fair in total?"),
    ("I planted {n} tulip bulbs in the front garden today.", "How many tulip bulbs have I planted in total?"),
    ("I dropped off {n} books for the library's charity sale today.",
     "How many books have I given to the library's charity sale in total?"),
    ("I knitted {n} hats for the shelter's winter drive this week.",
     "How many hats have I knitted for the shelter's winter drive in total?"),
)  # fmt: skip
_UPDATES = (  # (first statement, update, question, unit, value range)
    ("My personal best for the 10K is {v} minutes.", "I set a new 10K personal best today: {v} minutes!",
     "What is my current personal best for the 10K?", "minutes", (41, 68)),
    ("My monthly rent is {v} euros.", "Our landlord raised the rent; I pay {v} euros a month now.",
     "How much rent do I pay per month now?", "euros", (700, 1900)),
    ("My commute to the office takes {v} minutes by tram.",
     "Since the new tram line opened, my commute takes {v} minutes.",
     "How long does my commute to the office take now?", "minutes", (14, 75)),
)  # fmt: skip
_EVENTS = (  # (statement, how a question names it)
    ("I finally ran my first half marathon today!", "ran my first half marathon"),
    ("I repainted the garden fence today.", "repainted the garden fence"),
    ("I passed my driving test this morning!", "passed my driving test"),
    ("We hosted a dinner for twelve people tonight.", "hosted the dinner for twelve people"),
    ("I handed in my thesis draft today.", "handed in my thesis draft"),
    ("I replaced the leaking kitchen tap today.", "replaced the leaking kitchen tap"),
)  # fmt: skip
_ACKS = ("That's great to hear, thanks for sharing!", "Noted, thanks for letting me know.",
         "Good to know! Let me know if I can help with anything related.", "Thanks for the update.")  # fmt: skip
_ASKS = ("I'm reading the Python documentation. Could you explain this part?",
         "What does this paragraph from the docs mean in practice?", "Can you help me understand this?",
         "Here's a passage I found confusing:", "Could you summarise this for me?")  # fmt: skip
_REPLIES = ("Sure. Here is the related part of the documentation, which puts it in context:",
            "Of course. The documentation continues like this:", "Happy to help. The next passage explains it:",
            "Good question. Read it together with this:")  # fmt: skip
_START = dt.date(2022, 1, 3)


@dataclass
class _Plan:
    """What a generator decides before the filler is laid out: evidence sessions, the question and its answer."""

    question_type: str
    question: str
    # Evidence sessions in chronological order; each is a list of (role, text, is_evidence) turns.
    evidence: list[list[tuple[str, str, bool]]]
    answer: str | Callable[[list[dt.date], dt.date], str]
    aliases: list[str] = field(default_factory=list)
    # Phrases that must not occur anywhere in the history (what an abstention question asks about).
    absent: list[str] = field(default_factory=list)


def _user_fact(text: str) -> list[tuple[str, str, bool]]:
    return [("user", text, True), ("assistant", "", False)]


# ------------------------------------------------------------------------------------------------- abilities


def _personal_facts(rng: random.Random) -> list[tuple[str, str, str, str, str]]:
    """(statement, question, answer, unasked question, unasked phrase) for facts a user might tell."""
    activity, other = rng.sample(_ACTIVITIES, 2)
    relative, other_relative = rng.sample(_RELATIVES, 2)
    venue, gift, book, neighbour = rng.choice(_VENUES), rng.choice(_GIFTS), rng.choice(_BOOKS), rng.choice(_NEIGHBOURS)
    return [
        (f"I finally signed up for a {activity} class at {venue}.", f"Where did I sign up for a {activity} class?",
         venue.removeprefix("the "), f"Where did I sign up for a {other} class?", other),
        (f"I ordered {gift} for my {relative}'s birthday.", f"What did I order for my {relative}'s birthday?",
         gift.split(" ", 1)[1], f"What did I order for my {other_relative}'s birthday?", other_relative),
        (f"I've been reading {book} on the train every morning.", "Which book have I been reading on the train?",
         book, "Which podcast have I been listening to on the train?", "podcast"),
        (f"Our new downstairs neighbour is called {neighbour}; she brought us a lemon cake.",
         "What is the name of my new downstairs neighbour?", neighbour,
         "What is the name of my new upstairs neighbour?", "upstairs"),
    ]  # fmt: skip


def _information_extraction(rng: random.Random) -> _Plan:
    if rng.random() < 0.5:
        statement, question, answer, _, _ = rng.choice(_personal_facts(rng))
        return _Plan("single-session-user", question, [_user_fact(statement)], answer)
    if rng.random() < 0.5:
        thing, name = rng.choice(_THINGS_TO_NAME), rng.choice(_SUGGESTED_NAMES)
        turns = [("user", f"Can you suggest a name for my {thing}?", False),
                 ("assistant", f'How about "{name}"? It is short and easy to remember.', True)]  # fmt: skip
        question = f"In one of our chats you suggested a name for my {thing}. What was it?"
        return _Plan("single-session-assistant", question, [turns], name)
    plant, days = rng.choice(_PLANTS), rng.randint(3, 16)
    turns = [("user", f"How often should I water my {plant}?", False),
             ("assistant", f"For a {plant} indoors, water it every {days} days and let the soil dry in between.",
              True)]  # fmt: skip
    question = f"How often did you tell me to water my {plant}?"
    return _Plan("single-session-assistant", question, [turns], f"every {days} days", aliases=[f"{days} days"])


def _multi_session(rng: random.Random) -> _Plan:
    statement, question = rng.choice(_TALLIES)
    counts = [rng.randint(2, 9) for _ in range(rng.randint(2, 4))]
    evidence = [_user_fact(statement.format(n=n)) for n in counts]
    return _Plan("multi-session", question, evidence, str(sum(counts)))


def _knowledge_update(rng: random.Random) -> _Plan:
    first, update, question, unit, (lo, hi) = rng.choice(_UPDATES)
    old, new = rng.sample(range(lo, hi + 1), 2)
    evidence = [_user_fact(first.format(v=old)), _user_fact(update.format(v=new))]
    return _Plan("knowledge-update", question, evidence, f"{new} {unit}")


def _days(n: int) -> str:
    return f"{n} day" if n == 1 else f"{n} days"


def _temporal_reasoning(rng: random.Random) -> _Plan:
    events = rng.sample(_EVENTS, 2)
    if rng.random() < 0.5:
        (statement, name), _ = events
        question = f"How many days ago did I {name}?"
        return _Plan(
            "temporal-reasoning", question, [_user_fact(statement)], lambda d, today: _days((today - d[0]).days)
        )
    question = f"How many days passed between the day I {events[0][1]} and the day I {events[1][1]}?"
    evidence = [_user_fact(events[0][0]), _user_fact(events[1][0])]
    return _Plan("temporal-reasoning", question, evidence, lambda d, today: _days((d[1] - d[0]).days))


def _abstention(rng: random.Random) -> _Plan:
    statement, _, _, unasked, absent = rng.choice(_personal_facts(rng))
    answer = f"The information provided is not enough. You did not mention {absent}."
    return _Plan("single-session-user", unasked, [_user_fact(statement)], answer, absent=[absent])


ABILITY_PLANS: dict[str, Callable[[random.Random], _Plan]] = {
    "information_extraction": _information_extraction,
    "multi_session": _multi_session,
    "knowledge_update": _knowledge_update,
    "temporal_reasoning": _temporal_reasoning,
    "abstention": _abstention,
}


# ---------------------------------------------------------------------------------------------- the history


@functools.cache
def _paragraphs() -> tuple[str, ...]:
    """Paragraphs of the evaluation modules' docstrings, module by module in source order (neighbours related)."""
    return tuple(p for _, entries in doc_entries() for e in entries for p in e.text.split("\n\n") if len(p) >= 100)


def _date_text(day: dt.date, minutes: int) -> str:
    return f"{day:%Y/%m/%d} ({day:%a}) {minutes // 60:02d}:{minutes % 60:02d}"


def local_item(task: str, key: str, size: int) -> tuple[MemItem, list[str]]:
    """One item testing ``task`` with ``size`` filler exchanges around its evidence.

    Args:
        task: one of :data:`~flashmemory.bench.longmemeval.format.LONGMEMEVAL_TASKS`.
        key: seed string; every random choice is drawn from ``random.Random(key)``.
        size: number of filler exchanges (a user turn quoting the documentation and the assistant's reply).

    Returns:
        The item and every accepted answer (the item's ``answer`` first).
    """
    rng = random.Random(key)
    plan = ABILITY_PLANS[task](rng)
    paragraphs = _paragraphs()

    def exchange() -> list[tuple[str, str, bool]]:
        i = rng.randrange(len(paragraphs) - 1)
        return [("user", f"{rng.choice(_ASKS)}\n\n{paragraphs[i]}", False),
                ("assistant", f"{rng.choice(_REPLIES)}\n\n{paragraphs[i + 1]}", False)]  # fmt: skip

    # Usually some chat before or after the fact, as in a real session.
    evidence = []
    for turns in plan.evidence:
        turns = _with_ack(rng, turns)
        where = rng.random()
        evidence.append(exchange() + turns if where < 0.35 else turns + exchange() if where < 0.7 else turns)
    # Everything drawn before this point is independent of ``size``; the layout below depends on it.
    exchanges = [exchange() for _ in range(size)]
    fillers: list[list[tuple[str, str, bool]]] = []
    while exchanges:
        take = rng.randint(1, 3)
        fillers.append([turn for ex in exchanges[:take] for turn in ex])
        exchanges = exchanges[take:]
    # Evidence sessions go to distinct random places in the chronology, in their own order.
    total = len(fillers) + len(evidence)
    slots = set(rng.sample(range(total), len(evidence)))
    evidence_at = sorted(slots)
    filler_iter, evidence_iter = iter(fillers), iter(evidence)
    sessions = [next(evidence_iter) if s in slots else next(filler_iter) for s in range(total)]
    days, day = [], _START + dt.timedelta(days=rng.randrange(900))
    for _ in range(total):
        day += dt.timedelta(days=rng.randint(1, 6))
        days.append(day)
    today = days[-1] + dt.timedelta(days=rng.randint(1, 20))
    answer = plan.answer if isinstance(plan.answer, str) else plan.answer([days[s] for s in evidence_at], today)
    ids = [f"answer_{s}" if s in evidence_at else f"session_{s}" for s in range(total)]
    item = MemItem(
        question_id=key + ("_abs" if task == "abstention" else ""),
        question_type=plan.question_type,
        question=plan.question,
        answer=answer,
        question_date=_date_text(today, rng.randrange(8 * 60, 23 * 60)),
        session_ids=tuple(ids),
        dates=tuple(_date_text(d, rng.randrange(7 * 60, 23 * 60)) for d in days),
        sessions=tuple(tuple(_turn(*t) for t in turns) for turns in sessions),
        answer_session_ids=tuple(ids[s] for s in evidence_at),
    )
    _check_absent(item, plan.absent)
    # A number with its unit ("12 days", "1450 euros") is also right as the bare number.
    number = re.fullmatch(r"(?:every )?(\d+) \w+", answer)
    return item, [answer, *plan.aliases, *([number.group(1)] if number else [])]


def _with_ack(rng: random.Random, turns: list[tuple[str, str, bool]]) -> list[tuple[str, str, bool]]:
    # An empty assistant turn after a user fact is the place for a plain acknowledgement.
    return [(role, text or rng.choice(_ACKS), ev) for role, text, ev in turns]


def _turn(role: str, text: str, is_evidence: bool) -> dict:
    return {"role": role, "content": text, "has_answer": True} if is_evidence else {"role": role, "content": text}


def _check_absent(item: MemItem, phrases: list[str]) -> None:
    for phrase in phrases:
        word = re.compile(rf"\b{re.escape(phrase)}\b", re.I)
        if any(word.search(t["content"]) for s in item.sessions for t in s):
            raise RuntimeError(
                f"{item.question_id}: the history mentions {phrase!r}, which the question says it never does"
            )
