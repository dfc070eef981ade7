"""Generate the embedded demo data: a tiny customer-support world, its eval sets and a ledger of planted defects.

    python -m demo.data                  # writes into the repository
    python -m demo.data --root DIR --seed 7

Files (paths relative to the root):

- data/pretrain/general.jsonl    20,000 {"prompt", "completion"} rows of general tasks: the demo base
                                 model's pretraining corpus (clean; repeated prompts allowed).
- data/raw/domain.jsonl          the target task, OpenAI chat format: a support message in, one compact
                                 JSON ticket out ({"intent", "order_id", "product", "urgency"}).
- data/raw/general.jsonl         general tasks in Alpaca format, mixed in against forgetting.
- data/raw/preferences.jsonl     {"prompt", "chosen", "rejected"} pairs on support messages, for DPO.
- data/raw/DEFECTS.json          every planted defect of the three raw files, by 1-based line number.
- evals/data/support_gen.jsonl, support_mc.jsonl, general_gen.jsonl, general_mc.jsonl: held-out eval items.

The world is small on purpose: a ~1-2M parameter model with a 1024-token vocabulary must learn the general
tasks (sums, capital cities, reversing words, upper-casing, plurals, mood, small JSON objects) from the pretraining
corpus, and must not be able to do the domain task until it is fine-tuned. So every text is short, the
vocabulary is shared (products, intents, JSON keys and urgency words all occur in the general corpus too),
and the general corpus never contains the domain task itself (support message -> ticket).

Guarantees, checked by tests/test_demo_data.py:

- the same seed gives byte-identical files on any machine: every random draw comes from a seeded
  `random.Random`, and output is only ever built by iterating ordered containers;
- the planted defects are the only bad rows. Clean rows have unique prompts after case / whitespace /
  punctuation normalisation, no placeholder or e-mail address, no eval text (for general rows: none of
  two or more words, since one-word answers such as "Paris" are the general tasks themselves), and no
  two clean rows are near duplicates. "Eval text" and "near duplicate" are judged the way the dedup
  stage judges them with its default settings (`tunegate.config.Dedup`): the normalisation is shared
  (`tunegate.text`), the rest is re-implemented here so this module needs only the standard library;
- eval items are held out: no eval prompt occurs in the pretraining corpus or in a clean training row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from tunegate.text import normalise_text, words

T = TypeVar("T")

PRETRAIN = "data/pretrain/general.jsonl"
RAW_DOMAIN = "data/raw/domain.jsonl"
RAW_GENERAL = "data/raw/general.jsonl"
RAW_PREFERENCES = "data/raw/preferences.jsonl"
LEDGER = "data/raw/DEFECTS.json"
SUPPORT_GEN = "evals/data/support_gen.jsonl"
SUPPORT_MC = "evals/data/support_mc.jsonl"
GENERAL_GEN = "evals/data/general_gen.jsonl"
GENERAL_MC = "evals/data/general_mc.jsonl"

PRETRAIN_ROWS = 20_000
DOMAIN_CLEAN = 1500
GENERAL_CLEAN = 1500
PREFERENCE_CLEAN = 600
SUPPORT_EVAL = 150  # per support eval file
GENERAL_GEN_PER_TASK = 40
GENERAL_MC_PER_TASK = 50

# Planted defects per raw file, in ledger order.
DOMAIN_DEFECTS = {
    "malformed_json": 5,
    "missing_field": 4,
    "empty_content": 4,
    "wrong_role": 4,
    "template_leftover": 3,
    "pii_email": 3,
    "exact_duplicate": 30,
    "near_duplicate": 25,
    "eval_leak": 10,
    "contradiction": 8,
}
GENERAL_DEFECTS = {
    "malformed_json": 3,
    "missing_field": 3,
    "empty_content": 3,
    "exact_duplicate": 20,
    "near_duplicate": 15,
    "eval_leak": 10,
    "contradiction": 5,
}
PREFERENCE_DEFECTS = {"malformed_json": 2, "missing_field": 3, "chosen_equals_rejected": 4, "exact_duplicate": 5}

# The dedup stage's defaults (tunegate.config.Dedup). Clean rows stay well below the near-duplicate
# threshold and planted near duplicates well above it, so the ledger survives small changes to it.
CONTAMINATION_NGRAM = 13
NEAR_NGRAM = 3
NEAR_THRESHOLD = 0.7
CLEAN_MAX_SIMILARITY = NEAR_THRESHOLD - 0.05
NEAR_MIN_SIMILARITY = NEAR_THRESHOLD + 0.05

# --------------------------------------------------------------------------------------------------
# The domain: support messages and their tickets.

PRODUCTS = ("headphones", "laptop", "phone", "kettle", "blender", "jacket", "lamp", "chair", "watch", "camera")
INTENTS = ("refund", "replace", "track", "cancel", "complaint")
URGENCIES = ("high", "normal", "low")
TICKET_KEYS = ("intent", "order_id", "product", "urgency")

# Urgency is decided by these words alone, so no template may contain them.
HIGH_WORDS = ("urgent", "asap", "immediately", "today")
LOW_PHRASES = ("no rush", "when you can")
HIGH_SUFFIXES = ("Please help asap.", "I need it today.", "This is urgent.", "Please act immediately.")
LOW_SUFFIXES = ("No rush.", "Reply when you can.", "No rush, thanks.")
URGENCY_WEIGHTS = (3, 5, 2)  # high, normal, low

# {ref} becomes "order 48213" or "#48213". Templates avoid verb agreement with the product
# ("headphones" is plural) and the words of the general eval answers ("happy", plurals, numbers).
SUPPORT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "refund": (
        "I want my money back for the {product}, {ref}.",
        "Please refund the {product} from {ref}.",
        "Can I get a refund for the {product}? It is {ref}.",
        "Refund please: the {product}, {ref}.",
        "I returned the {product} ({ref}) and want a refund.",
        "The {product} did not fit my needs, refund {ref} please.",
        "How do I get my money back for {ref}, the {product}?",
        "Send me a refund for the {product}, {ref}.",
    ),
    "replace": (
        "The {product} from {ref} arrived broken, please send a new one.",
        "Can you replace the {product}? It came damaged, {ref}.",
        "I need a replacement for the {product}, {ref}.",
        "My {product} stopped working, please swap {ref}.",
        "Please exchange the faulty {product}, {ref}.",
        "The {product} in {ref} came with a crack, I want another.",
        "Send me a working {product} instead, {ref}.",
    ),
    "track": (
        "Where is {ref}? I am waiting for the {product}.",
        "Can you track {ref}? It has the {product}.",
        "When will the {product} from {ref} arrive?",
        "Has {ref} shipped yet? I ordered the {product}.",
        "Please tell me the status of {ref}, the {product}.",
        "No sign of the {product} yet, {ref}.",
        "What is the delivery date for the {product}, {ref}?",
    ),
    "cancel": (
        "Please cancel {ref}, I no longer need the {product}.",
        "Cancel the {product} in {ref}.",
        "I changed my mind about the {product}, cancel {ref}.",
        "Can you stop {ref} before it ships? It has the {product}.",
        "I ordered the {product} by mistake, please cancel {ref}.",
        "Do not send the {product}, cancel {ref} please.",
    ),
    "complaint": (
        "Terrible {product} from {ref}, and support never answers.",
        "I am very disappointed with the {product}, {ref}.",
        "Your delivery of the {product} was awful, {ref}.",
        "Poor quality {product} in {ref}, this is not acceptable.",
        "I want to complain about the {product}, {ref}.",
        "Bad service: the {product} came late and dirty, {ref}.",
        "The courier was rude when delivering the {product}, {ref}.",
    ),
}

# Wrong answers for preference pairs: a plausible reply that is not the ticket.
CHATTY_REPLIES = (
    "Sure! I can help with your {product}. Could you tell me more?",
    "Thanks for reaching out about order {order_id}. We will look into it.",
    "Hello! Your request about the {product} has been noted.",
    "I am sorry to hear that. Someone will contact you soon.",
    "Of course, let me check order {order_id} for you.",
)

# Near-duplicate edits: each changes a word or two and never the ticket.
GREETINGS = ("Hi!", "Hello!", "Hey!")  # a sentence of its own, so the prompt keeps its capital letter
SYNONYMS = (
    ("want", "need"),
    ("broken", "damaged"),
    ("terrible", "awful"),
    ("Please", "Kindly"),
    ("please", "kindly"),
    ("Send", "Ship"),
    ("arrive", "come"),
    ("very", "really"),
    ("tell", "show"),
    ("faulty", "defective"),
)
FILLERS = ((r"\b(want|need)\b", r"really \1"), (r"\bCan you\b", "Can you please"), (r"\bI am\b", "I am really"))

PII_NAMES = (("anna", "berg"), ("ben", "lund"), ("carl", "holm"), ("dana", "stone"), ("eva", "novak"))

# --------------------------------------------------------------------------------------------------
# General tasks: (instruction, input) templates. The first EVAL_TEMPLATES[family] templates of a family
# are single-line and may be used by eval items; the others only ever appear in training text.

ADD_TEMPLATES = (
    ("What is {a} + {b}?", None),
    ("Add {a} and {b}.", None),
    ("What do {a} and {b} make?", None),
    ("Add the two numbers.", "{a} + {b}"),
    ("Compute the sum.", "{a} + {b}"),
)
CAPITAL_TEMPLATES = (
    ("What is the capital of {country}?", None),
    ("Name the capital city of {country}.", None),
    ("Which city is the capital of {country}?", None),
    ("Tell me the capital of {country}.", None),
    ("{country} has which capital city?", None),
    ("Give the capital city of this country.", "{country}"),
    ("Capital city?", "{country}"),
)
REVERSE_TEMPLATES = (
    ("Reverse the word: {word}", None),
    ("Spell {word} backwards.", None),
    ("Write {word} in reverse.", None),
    ("Reverse the word.", "{word}"),
    ("Reverse this.", "{word}"),
)
UPPER_TEMPLATES = (
    ("Write in capitals: {text}", None),
    ("Make this uppercase: {text}", None),
    ("Write in capitals.", "{text}"),
    ("Uppercase this.", "{text}"),
)
PLURAL_TEMPLATES = (
    ("Plural of {noun}?", None),
    ("Write {noun} in the plural.", None),
    ("One {noun}, two what?", None),
    ("What do you call more than one {noun}?", None),
    ("Give the plural.", "{noun}"),
    ("Plural form?", "{noun}"),
)
MOOD_TEMPLATES = (
    ("Is this message happy or unhappy? {text}", None),
    ("Happy or unhappy?", "{text}"),
    ("Is the customer happy or unhappy?", "{text}"),
)
JSON_TEMPLATES = (
    ("Make JSON with {k1} {v1} and {k2} {v2}", None),
    ("Write JSON where {k1} is {v1} and {k2} is {v2}.", None),
    ("Make JSON from these fields.", "{k1}: {v1}, {k2}: {v2}"),
)
TEMPLATES: dict[str, tuple[tuple[str, str | None], ...]] = {
    "add": ADD_TEMPLATES,
    "capital": CAPITAL_TEMPLATES,
    "reverse": REVERSE_TEMPLATES,
    "upper": UPPER_TEMPLATES,
    "plural": PLURAL_TEMPLATES,
    "mood": MOOD_TEMPLATES,
    "json": JSON_TEMPLATES,
}
EVAL_TEMPLATES = {"add": 2, "capital": 5, "reverse": 3, "upper": 2, "plural": 4, "mood": 1}
# Sums, phrases and mood texts of eval items are held out whole (no training row asks about them in any
# wording): they are skills, not facts. Capitals, plurals and reversed words are facts the base can only
# know from pretraining, so for those only the eval item's exact wording is held out.
WHOLE_KEY_HOLDOUT = ("add", "upper", "mood")
GENERAL_GEN_TASKS = ("add", "capital", "reverse", "upper", "plural")
GENERAL_MC_TASKS = ("capital", "add", "plural", "mood")

CAPITALS = (
    ("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Portugal", "Lisbon"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Greece", "Athens"), ("Ireland", "Dublin"),
    ("Hungary", "Budapest"), ("Czechia", "Prague"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Ghana", "Accra"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Iran", "Tehran"), ("Turkey", "Ankara"), ("Canada", "Ottawa"), ("Peru", "Lima"),
    ("Cuba", "Havana"), ("Chile", "Santiago"), ("Australia", "Canberra"),
)  # fmt: skip
REVERSE_WORDS = PRODUCTS + INTENTS + (
    "order", "money", "parcel", "price", "color", "city", "name", "status", "urgency", "intent",
    "product", "help", "today", "box", "cup", "book", "bag", "hat", "dog", "cat",
    "sun", "tree", "house", "water", "bread", "apple", "river", "green", "blue", "red",
    "black", "white", "happy", "broken", "late", "early", "fast", "slow", "window", "table",
    "paper", "music", "garden", "friend", "winter",
)  # fmt: skip
PLURALS = (
    ("child", "children"), ("mouse", "mice"), ("foot", "feet"), ("tooth", "teeth"), ("man", "men"),
    ("woman", "women"), ("ox", "oxen"), ("goose", "geese"), ("knife", "knives"), ("leaf", "leaves"),
    ("box", "boxes"), ("bus", "buses"), ("glass", "glasses"), ("dish", "dishes"), ("brush", "brushes"),
    ("watch", "watches"), ("fox", "foxes"), ("city", "cities"), ("baby", "babies"), ("story", "stories"),
    ("party", "parties"), ("key", "keys"), ("toy", "toys"), ("boy", "boys"), ("lamp", "lamps"),
    ("chair", "chairs"), ("kettle", "kettles"), ("phone", "phones"), ("laptop", "laptops"), ("camera", "cameras"),
    ("jacket", "jackets"), ("blender", "blenders"), ("order", "orders"), ("refund", "refunds"), ("bag", "bags"),
    ("cup", "cups"), ("book", "books"), ("car", "cars"), ("dog", "dogs"), ("hat", "hats"),
)  # fmt: skip

# Upper-casing phrases: 2-4 words of the shared vocabulary, including the urgency words.
UPPER_NOUNS = PRODUCTS + ("order", "parcel")
UPPER_STATES = ("late", "lost", "here", "fine", "great", "new")
UPPER_ACTIONS = ("track", "cancel", "replace", "refund", "return", "check")
UPPER_ADJECTIVES = ("new", "old", "red", "cheap", "small", "big")
UPPER_PAST = ("arrived", "shipped", "broke")
UPPER_EXTRA = tuple(
    f"{v} it {w}" for v in ("fix", "send", "ship", "check") for w in ("asap", "today", "now", "immediately")
) + (
    "no rush at all",
    "answer when you can",
    "it is urgent",
    "urgent help",
    "an urgent order",
)

# Mood texts about the products; unhappy ones describe a problem but never ask for anything, so they
# do not teach the domain task's wording.
HAPPY_TEXTS = (
    "I love my new {product}, thanks!",
    "The {product} arrived early, great job!",
    "Best {product} I ever bought.",
    "My {product} came fast and in perfect shape.",
    "Thank you, the {product} made a great gift.",
    "Very pleased with the {product}.",
    "Great quality {product}, I am so glad.",
    "Five stars for the {product}, thanks a lot!",
    "The {product} made my week, wonderful!",
    "So glad I chose the {product}.",
)
UNHAPPY_TEXTS = (
    "My {product} arrived broken.",
    "The {product} stopped working after a week.",
    "Still waiting for my {product}, so slow.",
    "The {product} came late and scratched.",
    "Worst {product} I ever bought.",
    "The {product} felt cheap and flimsy.",
    "My {product} broke on the first day.",
    "Sadly the {product} never arrived.",
    "The {product} arrived dirty and used.",
    "What a pity, the {product} turned out noisy and slow.",
)

# Small JSON objects with other keys, so the base knows the ticket's shape and keys before fine-tuning.
NAMES = ("Anna", "Ben", "Carl", "Dana", "Eva", "Finn", "Gina", "Hugo", "Ida", "Jon", "Kim", "Lena")
COLORS = ("red", "blue", "green", "black", "white")
STATUSES = ("shipped", "delivered", "pending", "lost", "returned")
JSON_FIELDS: tuple[tuple[str, tuple[str, ...] | None, str, tuple[str, ...]], ...] = (
    ("name", NAMES, "city", tuple(c for _, c in CAPITALS)),
    ("name", NAMES, "product", PRODUCTS),
    ("product", PRODUCTS, "color", COLORS),
    ("order_id", None, "status", STATUSES),  # None: a random 5-digit id
    ("intent", INTENTS, "urgency", URGENCIES),
)

# --------------------------------------------------------------------------------------------------
# Text checks, mirroring tunegate.dedup (which needs numpy; this module must not). The normalisation
# (`normalise_text`, `words`) is tunegate.text's, the same that tunegate.dedup uses.


def shingles(text: str, n: int = NEAR_NGRAM) -> frozenset[str]:
    w = words(text)
    if len(w) <= n:
        return frozenset({" ".join(w)})
    return frozenset(" ".join(w[i : i + n]) for i in range(len(w) - n + 1))


def jaccard(x: frozenset[str], y: frozenset[str]) -> float:
    return len(x & y) / len(x | y) if x or y else 1.0


class EvalIndex:
    """Does a text contain an eval text? Word n-grams for long eval texts, the whole text for short ones."""

    def __init__(self, texts: Iterable[str], n: int = CONTAMINATION_NGRAM):
        self.n = n
        self.long: set[tuple[str, ...]] = set()
        self.short: set[tuple[str, ...]] = set()
        for text in texts:
            w = tuple(words(text))
            if len(w) >= n:
                self.long.update(w[i : i + n] for i in range(len(w) - n + 1))
            elif w:
                self.short.add(w)
        self.sizes = sorted({len(k) for k in self.short}, reverse=True)

    def hits(self, text: str) -> bool:
        w = tuple(words(text))
        if any(w[i : i + self.n] in self.long for i in range(len(w) - self.n + 1)):
            return True
        return any(w[i : i + size] in self.short for size in self.sizes for i in range(len(w) - size + 1))


def eval_texts(row: dict[str, Any]) -> list[str]:
    """The texts of one eval item that the dedup stage indexes: prompt fields, answer, correct choice."""
    fields = ("prompt", "message", "question", "query", "input", "text", "answer", "target", "output")
    texts = [row[f] for f in fields if isinstance(row.get(f), str)]
    if isinstance(row.get("choices"), list) and isinstance(row.get("label"), int):
        texts.append(str(row["choices"][row["label"]]))
    return texts


def urgency_of(message: str) -> str:
    """The ticket's urgency, decided by the message's wording alone."""
    padded = f" {normalise_text(message)} "
    if any(f" {w} " in padded for w in HIGH_WORDS):
        return "high"
    if any(f" {p} " in padded for p in LOW_PHRASES):
        return "low"
    return "normal"


def ticket_json(intent: str, order_id: str, product: str, urgency: str) -> str:
    return json.dumps({"intent": intent, "order_id": order_id, "product": product, "urgency": urgency})


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _chat(user: str, assistant: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _rng(seed: int, part: str) -> random.Random:
    # One stream per part, so changing one part (say, the eval sets) leaves the others' draws alone.
    # String seeds are hashed with sha512 by random.Random: stable across machines and PYTHONHASHSEED.
    return random.Random(f"tunegate-demo/{seed}/{part}")


def _retry(make: Callable[[], T | None], what: str, tries: int = 2000) -> T:
    """Rejection sampling: call make() until it returns an item. Bounded, so that tables too small for
    the constraints fail loudly instead of looping forever."""
    for _ in range(tries):
        if (item := make()) is not None:
            return item
    raise RuntimeError(
        f"demo data: no acceptable {what} in {tries} tries; the tables are too small for the constraints"
    )


class _Gate:
    """Admits clean rows: a new prompt (normalised), no eval text, no near copy of an admitted row.

    Near copies can only arise between rows that share a template or what is asked about (one mood
    text in two wordings), so a row is compared with the rows of its buckets only; the tests check
    the claim over all clean rows.
    """

    def __init__(self, blocked: EvalIndex):
        self.blocked = blocked
        self.seen: set[str] = set()
        self.buckets: dict[str, list[frozenset[str]]] = {}

    def reserve(self, prompt: str) -> None:
        self.seen.add(normalise_text(prompt))

    def admit(self, prompt: str, text: str, buckets: tuple[str, ...]) -> bool:
        key = normalise_text(prompt)
        if key in self.seen or self.blocked.hits(text):
            return False
        sh = shingles(text)
        if any(jaccard(sh, other) >= CLEAN_MAX_SIMILARITY for b in buckets for other in self.buckets.get(b, ())):
            return False
        self.seen.add(key)
        for b in buckets:
            self.buckets.setdefault(b, []).append(sh)
        return True


# --------------------------------------------------------------------------------------------------
# Support tickets.


@dataclass(frozen=True)
class Ticket:
    message: str
    intent: str
    order_id: str
    product: str
    urgency: str
    template: str  # "<intent>/<index>"

    @property
    def buckets(self) -> tuple[str, ...]:
        return (self.template,)  # the order id is unique, so only the wording can make two tickets alike

    @property
    def answer(self) -> str:
        return ticket_json(self.intent, self.order_id, self.product, self.urgency)

    @property
    def text(self) -> str:
        return f"{self.message}\n{self.answer}"


class _Tickets:
    """Makes support tickets; every order id is used once across all files, so no two messages collide."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def order_id(self, rng: random.Random) -> str:
        while True:
            oid = str(rng.randint(10000, 99999))
            if oid not in self.ids:
                self.ids.add(oid)
                return oid

    def make(self, rng: random.Random, intent: str | None = None, placeholder: bool = False) -> Ticket:
        intent = intent or rng.choice(INTENTS)
        index = rng.randrange(len(SUPPORT_TEMPLATES[intent]))
        product = rng.choice(PRODUCTS)
        oid = self.order_id(rng)
        ref = f"order {oid}" if rng.random() < 0.6 else f"#{oid}"
        urgency = rng.choices(URGENCIES, weights=URGENCY_WEIGHTS)[0]
        message = SUPPORT_TEMPLATES[intent][index].format(product="{product}" if placeholder else product, ref=ref)
        if urgency == "high":
            message += " " + rng.choice(HIGH_SUFFIXES)
        elif urgency == "low":
            message += " " + rng.choice(LOW_SUFFIXES)
        assert urgency_of(message) == urgency, message
        return Ticket(message, intent, oid, product, urgency, f"{intent}/{index}")


def _support_eval(rng: random.Random, tickets: _Tickets) -> tuple[list[dict], list[dict]]:
    gen_tickets = [tickets.make(rng, INTENTS[i % len(INTENTS)]) for i in range(SUPPORT_EVAL)]
    mc_tickets = [tickets.make(rng, INTENTS[i % len(INTENTS)]) for i in range(SUPPORT_EVAL)]
    rng.shuffle(gen_tickets)
    rng.shuffle(mc_tickets)
    gen = [
        {"id": f"support-{i:04d}", "message": t.message, "answer": t.answer, "intent": t.intent}
        for i, t in enumerate(gen_tickets, 1)
    ]
    mc = []
    for i, t in enumerate(mc_tickets, 1):
        other_intent = rng.choice([x for x in INTENTS if x != t.intent])
        other_urgency = rng.choice([u for u in URGENCIES if u != t.urgency])
        third_intent = rng.choice([x for x in INTENTS if x not in (t.intent, other_intent)])
        # One distractor each: wrong intent, wrong urgency, both wrong.
        options = [
            (t.intent, t.urgency),
            (other_intent, t.urgency),
            (t.intent, other_urgency),
            (third_intent, other_urgency),
        ]
        rng.shuffle(options)
        choices = [ticket_json(intent, t.order_id, t.product, urgency) for intent, urgency in options]
        mc.append(
            {"id": f"support-mc-{i:04d}", "message": t.message, "choices": choices, "label": choices.index(t.answer)}
        )
    return gen, mc


# --------------------------------------------------------------------------------------------------
# General tasks.


@dataclass(frozen=True)
class Task:
    family: str
    key: str  # what is asked about (a country, a noun, "17+25", a mood text): the hold-out unit
    template: int
    instruction: str
    input: str
    answer: str

    @property
    def prompt(self) -> str:
        """The user turn, as the pipeline builds it from an Alpaca row."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction

    @property
    def text(self) -> str:
        return f"{self.prompt}\n{self.answer}"

    @property
    def buckets(self) -> tuple[str, ...]:
        return (f"{self.family}/template/{self.template}", f"{self.family}/key/{self.key}")


def _be(noun: str) -> str:
    return "are" if noun.endswith("s") else "is"


@cache
def _facts(family: str) -> tuple[tuple[str, tuple[tuple[str, str], ...], str], ...]:
    """Every (key, template fields, answer) of an enumerable family, in a fixed order."""
    if family == "add":
        return tuple((f"{a}+{b}", (("a", str(a)), ("b", str(b))), str(a + b)) for a in range(50) for b in range(50))
    if family == "capital":
        return tuple((c, (("country", c),), city) for c, city in CAPITALS)
    if family == "reverse":
        return tuple((w, (("word", w),), w[::-1]) for w in REVERSE_WORDS)
    if family == "plural":
        return tuple((n, (("noun", n),), p) for n, p in PLURALS)
    if family == "upper":
        phrases: list[str] = []
        for x in UPPER_NOUNS:
            phrases += [f"my {x} {_be(x)} {s}" for s in UPPER_STATES]
            phrases += [f"{a} my {x}" for a in UPPER_ACTIONS]
            phrases += [f"{adj} {x}" for adj in UPPER_ADJECTIVES]
            phrases += [f"the {x} {p}" for p in UPPER_PAST]
        phrases += UPPER_EXTRA
        return tuple((p, (("text", p),), p.upper()) for p in phrases)
    if family == "mood":
        texts = [(t.format(product=p), "happy") for t in HAPPY_TEXTS for p in PRODUCTS]
        texts += [(t.format(product=p), "unhappy") for t in UNHAPPY_TEXTS for p in PRODUCTS]
        return tuple((t, (("text", t),), mood) for t, mood in texts)
    raise ValueError(f"family {family!r} is sampled, not enumerated")


def _json_fact(rng: random.Random) -> tuple[str, tuple[tuple[str, str], ...], str]:
    k1, values1, k2, values2 = rng.choice(JSON_FIELDS)
    v1 = str(rng.randint(10000, 99999)) if values1 is None else rng.choice(values1)
    v2 = rng.choice(values2)
    answer = json.dumps({k1: v1, k2: v2})
    return answer, (("k1", k1), ("v1", v1), ("k2", k2), ("v2", v2)), answer


def _render(family: str, fact: tuple[str, tuple[tuple[str, str], ...], str], template: int) -> Task:
    key, fields, answer = fact
    instruction, inp = TEMPLATES[family][template]
    values = dict(fields)
    return Task(family, key, template, instruction.format(**values), inp.format(**values) if inp else "", answer)


def _sample_task(rng: random.Random, family: str) -> Task:
    fact = _json_fact(rng) if family == "json" else rng.choice(_facts(family))
    return _render(family, fact, rng.randrange(len(TEMPLATES[family])))


def _mc_choices(rng: random.Random, task: Task) -> tuple[list[str], int]:
    if task.family == "mood":
        choices = ["happy", "unhappy"]  # two labels, in a fixed order
        return choices, choices.index(task.answer)
    if task.family == "capital":
        wrong = rng.sample([c for _, c in CAPITALS if c != task.answer], 3)
    elif task.family == "add":
        total = int(task.answer)
        wrong = rng.sample([str(total + d) for d in (-10, -2, -1, 1, 2, 10) if total + d >= 0], 3)
    elif task.family == "plural":
        noun = task.key
        forms = [f for f in dict.fromkeys((noun + "s", noun + "es", noun + "en", noun)) if f != task.answer]
        wrong = rng.sample(forms, 3)
    else:
        raise ValueError(f"no multiple choice for {task.family!r}")
    choices = [task.answer, *wrong]
    rng.shuffle(choices)
    return choices, choices.index(task.answer)


def _general_eval(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Held-out general items. Facts are spread over keys (at most ceil(need / keys) wordings per key),
    so every country, noun and word keeps wordings for the training data."""
    need = {
        f: GENERAL_GEN_PER_TASK * (f in GENERAL_GEN_TASKS) + GENERAL_MC_PER_TASK * (f in GENERAL_MC_TASKS)
        for f in EVAL_TEMPLATES
    }
    picked: dict[str, list[Task]] = {}
    for family, n in need.items():
        facts = _facts(family)
        candidates = [(i, t) for i in range(len(facts)) for t in range(EVAL_TEMPLATES[family])]
        rng.shuffle(candidates)
        cap = math.ceil(n / len(facts))
        per_key = [0] * len(facts)
        chosen: list[Task] = []
        for i, t in candidates:
            if len(chosen) == n:
                break
            if per_key[i] < cap:
                per_key[i] += 1
                chosen.append(_render(family, facts[i], t))
        picked[family] = chosen
    gen_tasks = [t for f in GENERAL_GEN_TASKS for t in picked[f][:GENERAL_GEN_PER_TASK]]
    mc_tasks = [t for f in GENERAL_MC_TASKS for t in picked[f][len(picked[f]) - GENERAL_MC_PER_TASK :]]
    rng.shuffle(gen_tasks)
    rng.shuffle(mc_tasks)
    gen = [
        {"id": f"general-{i:04d}", "task": t.family, "prompt": t.prompt, "answer": t.answer}
        for i, t in enumerate(gen_tasks, 1)
    ]
    mc = []
    for i, t in enumerate(mc_tasks, 1):
        choices, label = _mc_choices(rng, t)
        mc.append(
            {"id": f"general-mc-{i:04d}", "task": t.family, "prompt": t.prompt, "choices": choices, "label": label}
        )
    return gen, mc


def _held_out_keys(gen: list[dict], mc: list[dict]) -> set[tuple[str, str]]:
    """(family, key) of every eval item whose key is held out whole, recovered from the eval prompts."""
    keys = set()
    by_prompt = {}
    for family in WHOLE_KEY_HOLDOUT:
        for fact in _facts(family):
            for t in range(EVAL_TEMPLATES[family]):
                by_prompt[(family, _render(family, fact, t).prompt)] = fact[0]
    for row in gen + mc:
        key = by_prompt.get((row["task"], row["prompt"]))
        if key is not None:
            keys.add((row["task"], key))
    return keys


# --------------------------------------------------------------------------------------------------
# Raw files: clean rows, planted defects, a seeded shuffle and the ledger.


@dataclass(frozen=True)
class _Row:
    line: str
    defect: str | None = None
    of: int | None = None  # index of the clean row this one copies
    eval_id: str | None = None


# Each produces a line json.loads rejects.
_MALFORMED: tuple[Callable[[str, str], str], ...] = (
    lambda line, text: line[: len(line) * 2 // 3],  # a record cut off mid-write
    lambda line, text: line + " }",  # garbage after the object
    lambda line, text: text,  # bare text, no JSON at all
    lambda line, text: line.replace('"', "'"),  # Python repr quoting
    lambda line, text: line[:-1] + ",}",  # trailing comma
)

# Each leaves the text equal after normalisation (case, whitespace, punctuation).
_NOISE: tuple[Callable[[str], str], ...] = (
    lambda s: s,
    str.lower,
    lambda s: s.replace(" ", "  "),
    lambda s: s.rstrip(".?!") + "!!",
    str.upper,
    lambda s: f" {s} ",
    lambda s: s.rstrip(".?!"),
)


def _near_edits(rng: random.Random, text: str, greetings_only: bool = False) -> list[str]:
    """Small word edits of a prompt, in a seeded order."""
    edits = [f"{g} {text}" for g in GREETINGS]
    if not greetings_only:
        for old, new in SYNONYMS:
            if re.search(rf"\b{old}\b", text):
                edits.append(re.sub(rf"\b{old}\b", new, text, count=1))
        for pattern, repl in FILLERS:
            if re.search(pattern, text):
                edits.append(re.sub(pattern, repl, text, count=1))
    rng.shuffle(edits)
    return edits


def _assemble(
    rng: random.Random, rows: list[_Row], n_clean: int, defects: dict[str, int]
) -> tuple[list[str], dict[str, Any]]:
    """Shuffle the rows; copies always follow the clean row they copy (so "first seen wins" keeps the
    clean row), then describe every defect by 1-based line number."""
    pos = list(range(len(rows)))
    rng.shuffle(pos)
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        if row.of is not None:
            groups.setdefault(row.of, []).append(i)
    for original, copies in groups.items():
        members = [original, *sorted(copies, key=lambda c: pos[c])]
        for member, slot in zip(members, sorted(pos[m] for m in members), strict=True):
            pos[member] = slot
    lines = [""] * len(rows)
    for i, p in enumerate(pos):
        lines[p] = rows[i].line
    ledger: dict[str, Any] = {"clean_rows": n_clean, "total_lines": len(rows)}
    for defect, count in defects.items():
        members = sorted((pos[i] + 1, i) for i, row in enumerate(rows) if row.defect == defect)
        assert len(members) == count, (defect, len(members), count)
        entry: dict[str, Any] = {"count": count, "lines": [line for line, _ in members]}
        if defect in ("exact_duplicate", "near_duplicate", "contradiction"):
            entry["of_lines"] = [pos[rows[i].of] + 1 for _, i in members]  # type: ignore[index]
        if defect == "eval_leak":
            entry["eval_ids"] = [rows[i].eval_id for _, i in members]
        ledger[defect] = entry
    return lines, ledger


def _copies(
    originals: Sequence[int],
    prompt_of: Callable[[int], str],
    row_with: Callable[[int, str], str],
) -> list[_Row]:
    """Copies of clean rows whose prompt differs only by case / whitespace / punctuation noise."""
    out = []
    for k, i in enumerate(originals):
        prompt = _NOISE[k % len(_NOISE)](prompt_of(i))
        assert normalise_text(prompt) == normalise_text(prompt_of(i))
        out.append(_Row(row_with(i, prompt), "exact_duplicate", of=i))
    return out


def _admitted_ticket(
    rng: random.Random, tickets: _Tickets, gate: _Gate, intent: str | None = None, placeholder: bool = False
) -> Ticket:
    def make() -> Ticket | None:
        t = tickets.make(rng, intent, placeholder)
        return t if gate.admit(t.message, t.text, t.buckets) else None

    return _retry(make, "support ticket")


def _domain_raw(  # noqa: C901 - one block per planted defect kind, in the order of the DEFECTS ledger
    rng: random.Random, tickets: _Tickets, gate: _Gate, support_gen: list[dict]
) -> tuple[list[str], dict[str, Any]]:
    clean = [_admitted_ticket(rng, tickets, gate, INTENTS[i % len(INTENTS)]) for i in range(DOMAIN_CLEAN)]

    def fresh(placeholder: bool = False) -> Ticket:  # a valid new ticket to carry one defect
        return _admitted_ticket(rng, tickets, gate, placeholder=placeholder)

    rows = [_Row(_dumps(_chat(t.message, t.answer))) for t in clean]
    d = DOMAIN_DEFECTS
    for k in range(d["malformed_json"]):
        t = fresh()
        rows.append(
            _Row(_MALFORMED[k % len(_MALFORMED)](_dumps(_chat(t.message, t.answer)), t.message), "malformed_json")
        )
    missing: tuple[Callable[[Ticket], dict], ...] = (
        lambda t: {"conversation": _chat(t.message, t.answer)["messages"]},
        lambda t: {"dialog": _chat(t.message, t.answer)["messages"]},
        lambda t: {"messages": None},
        lambda t: {"text": t.message},
    )
    for k in range(d["missing_field"]):
        rows.append(_Row(_dumps(missing[k % len(missing)](fresh())), "missing_field"))
    for k in range(d["empty_content"]):
        rows.append(_Row(_dumps(_chat(fresh().message, ("", " ", "   ", "\t")[k % 4])), "empty_content"))
    wrong_roles = (("user", "bot"), ("customer", "assistant"), ("assistant", "user"), ("user", "agent"))
    for k in range(d["wrong_role"]):
        t = fresh()
        first, second = wrong_roles[k % len(wrong_roles)]
        texts = (t.answer, t.message) if first == "assistant" else (t.message, t.answer)
        msgs = [{"role": first, "content": texts[0]}, {"role": second, "content": texts[1]}]
        rows.append(_Row(_dumps({"messages": msgs}), "wrong_role"))
    for _ in range(d["template_leftover"]):
        t = fresh(placeholder=True)
        rows.append(_Row(_dumps(_chat(t.message, t.answer)), "template_leftover"))
    for first, last in rng.sample(PII_NAMES, d["pii_email"]):
        email = f"{first}.{last}@example.com"

        def make_pii(email: str = email) -> tuple[str, str] | None:
            t = tickets.make(rng)
            message = f"{t.message} My email is {email}."
            return (message, t.answer) if gate.admit(message, f"{message}\n{t.answer}", t.buckets) else None

        message, answer = _retry(make_pii, "ticket with an e-mail")
        rows.append(_Row(_dumps(_chat(message, answer)), "pii_email"))

    order = rng.sample(range(len(clean)), len(clean))
    exact = order[: d["exact_duplicate"]]
    rows += _copies(exact, lambda i: clean[i].message, lambda i, p: _dumps(_chat(p, clean[i].answer)))
    near: list[_Row] = []
    for i in order[d["exact_duplicate"] :]:
        if len(near) == d["near_duplicate"]:
            break
        t = clean[i]
        for edit in _near_edits(rng, t.message):
            text = f"{edit}\n{t.answer}"
            close = jaccard(shingles(text), shingles(t.text)) >= NEAR_MIN_SIMILARITY
            if close and normalise_text(edit) != normalise_text(t.message) and not gate.blocked.hits(text):
                near.append(_Row(_dumps(_chat(edit, t.answer)), "near_duplicate", of=i))
                break
    rows += near
    for row in rng.sample(support_gen, d["eval_leak"]):
        rows.append(_Row(_dumps(_chat(row["message"], row["answer"])), "eval_leak", eval_id=row["id"]))
    # Contradictions copy rows that also have an exact duplicate, so the clean answer wins a majority vote.
    for i in rng.sample(exact, d["contradiction"]):
        t = clean[i]
        wrong = ticket_json(rng.choice([x for x in INTENTS if x != t.intent]), t.order_id, t.product, t.urgency)
        rows.append(_Row(_dumps(_chat(t.message, wrong)), "contradiction", of=i))
    return _assemble(rng, rows, len(clean), d)


def _preference_row(rng: random.Random, tickets: _Tickets, t: Ticket) -> dict[str, str]:
    if rng.random() < 0.5:
        rejected = rng.choice(CHATTY_REPLIES).format(product=t.product, order_id=t.order_id)
    else:
        fields = {"intent": t.intent, "order_id": t.order_id, "product": t.product, "urgency": t.urgency}
        key = rng.choice(TICKET_KEYS)
        if key == "order_id":
            fields[key] = tickets.order_id(rng)
        else:
            options = {"intent": INTENTS, "product": PRODUCTS, "urgency": URGENCIES}[key]
            fields[key] = rng.choice([v for v in options if v != fields[key]])
        rejected = ticket_json(**fields)
    return {"prompt": t.message, "chosen": t.answer, "rejected": rejected}


def _preference_text(row: dict[str, str]) -> str:
    return f"{row['prompt']}\n{row['chosen']}\n{row['rejected']}"


def _preferences(rng: random.Random, tickets: _Tickets, gate: _Gate) -> tuple[list[str], dict[str, Any]]:
    def draw(intent: str | None = None) -> dict[str, str]:
        def make() -> dict[str, str] | None:
            t = tickets.make(rng, intent)
            row = _preference_row(rng, tickets, t)
            return row if gate.admit(t.message, _preference_text(row), t.buckets) else None

        return _retry(make, "preference row")

    clean = [draw(INTENTS[i % len(INTENTS)]) for i in range(PREFERENCE_CLEAN)]
    rows = [_Row(_dumps(r)) for r in clean]
    d = PREFERENCE_DEFECTS
    for k in range(d["malformed_json"]):
        r = draw()
        rows.append(_Row((_MALFORMED[0], _MALFORMED[4])[k % 2](_dumps(r), r["prompt"]), "malformed_json"))
    for k in range(d["missing_field"]):
        r = draw()
        del r[("rejected", "chosen", "prompt")[k % 3]]
        rows.append(_Row(_dumps(r), "missing_field"))
    for k in range(d["chosen_equals_rejected"]):
        r = draw()
        r["rejected"] = r["chosen"] + (" " if k % 2 else "")  # the validate stage compares stripped text
        rows.append(_Row(_dumps(r), "chosen_equals_rejected"))
    originals = rng.sample(range(len(clean)), d["exact_duplicate"])
    rows += _copies(originals, lambda i: clean[i]["prompt"], lambda i, p: _dumps({**clean[i], "prompt": p}))
    return _assemble(rng, rows, len(clean), d)


def _alpaca(task: Task, instruction: str | None = None, output: str | None = None) -> dict[str, str]:
    return {
        "instruction": task.instruction if instruction is None else instruction,
        "input": task.input,
        "output": task.answer if output is None else output,
    }


def _general_clean(rng: random.Random, gate: _Gate, held_out: set[tuple[str, str]], n: int) -> list[Task]:
    """Round-robin over the families; a family whose distinct prompts run out drops out of the rotation."""
    active = list(TEMPLATES)
    misses = dict.fromkeys(active, 0)
    out: list[Task] = []
    while len(out) < n:
        if not active:
            raise RuntimeError(f"demo data: only {len(out)} distinct general rows of {n}")
        family = active[len(out) % len(active)]
        task = _sample_task(rng, family)
        if (family, task.key) not in held_out and gate.admit(task.prompt, task.text, task.buckets):
            out.append(task)
            misses[family] = 0
        else:
            misses[family] += 1
            if misses[family] >= 500:
                active.remove(family)
    return out


def _wrong_answer(rng: random.Random, task: Task) -> str:
    if task.family == "add":
        return str(int(task.answer) + rng.choice((1, 2, 10)))
    if task.family == "capital":
        return rng.choice([c for _, c in CAPITALS if c != task.answer])
    if task.family == "plural":
        return task.key + "s" if task.key + "s" != task.answer else task.key + "es"
    if task.family == "mood":
        return "unhappy" if task.answer == "happy" else "happy"
    if task.family == "reverse":
        return task.key
    raise ValueError(task.family)


def _general_raw(
    rng: random.Random, gate: _Gate, held_out: set[tuple[str, str]], general_gen: list[dict]
) -> tuple[list[str], dict[str, Any]]:
    clean = _general_clean(rng, gate, held_out, GENERAL_CLEAN)
    rows = [_Row(_dumps(_alpaca(t))) for t in clean]
    d = GENERAL_DEFECTS
    fresh = _general_clean(rng, gate, held_out, d["malformed_json"] + d["missing_field"] + d["empty_content"])
    for k in range(d["malformed_json"]):
        t = fresh.pop(0)
        rows.append(
            _Row((_MALFORMED[0], _MALFORMED[1], _MALFORMED[3])[k % 3](_dumps(_alpaca(t)), t.prompt), "malformed_json")
        )
    for k in range(d["missing_field"]):
        t = fresh.pop(0)
        record = (
            {"instruction": t.instruction, "input": t.input},
            {"instruction": t.instruction, "input": t.input, "response": t.answer},
            {"instruction": t.instruction, "input": t.input, "output": None},
        )[k % 3]
        rows.append(_Row(_dumps(record), "missing_field"))
    for k in range(d["empty_content"]):
        rows.append(_Row(_dumps(_alpaca(fresh.pop(0), output=("", " ", "  ")[k % 3])), "empty_content"))

    # Contradictions need an answer that differs after normalisation (upper-casing does not), and copy
    # rows that also have an exact duplicate, so the clean answer wins a majority vote.
    order = rng.sample(range(len(clean)), len(clean))
    contradictable = [i for i in order if clean[i].family in ("add", "capital", "plural", "mood", "reverse")]
    contra = contradictable[: d["contradiction"]]
    exact = contra + [i for i in order if i not in contra][: d["exact_duplicate"] - len(contra)]
    rows += _copies(exact, lambda i: clean[i].instruction, lambda i, p: _dumps(_alpaca(clean[i], instruction=p)))
    near: list[_Row] = []
    for i in order:
        if len(near) == d["near_duplicate"]:
            break
        if i in exact:
            continue
        t = clean[i]
        for edit in _near_edits(rng, t.instruction, greetings_only=True):
            edited = Task(t.family, t.key, t.template, edit, t.input, t.answer)
            if jaccard(shingles(edited.text), shingles(t.text)) >= NEAR_MIN_SIMILARITY and not gate.blocked.hits(
                edited.text
            ):
                near.append(_Row(_dumps(_alpaca(edited)), "near_duplicate", of=i))
                break
    rows += near
    for row in rng.sample(general_gen, d["eval_leak"]):
        rows.append(
            _Row(
                _dumps({"instruction": row["prompt"], "input": "", "output": row["answer"]}),
                "eval_leak",
                eval_id=row["id"],
            )
        )
    for i in contra:
        rows.append(_Row(_dumps(_alpaca(clean[i], output=_wrong_answer(rng, clean[i]))), "contradiction", of=i))
    return _assemble(rng, rows, len(clean), d)


def _pretrain(rng: random.Random, blocked: EvalIndex, held_out: set[tuple[str, str]]) -> list[dict[str, str]]:
    families = list(TEMPLATES)
    verdict: dict[str, bool] = {}  # prompts repeat a lot; the eval check is the expensive part

    def ok(task: Task) -> bool:
        if (task.family, task.key) in held_out:
            return False
        if task.text not in verdict:
            verdict[task.text] = not blocked.hits(task.text)
        return verdict[task.text]

    rows = []
    for k in range(PRETRAIN_ROWS):
        family = families[k % len(families)]
        task = _retry(lambda family=family: t if ok(t := _sample_task(rng, family)) else None, "pretraining row")
        rows.append({"prompt": task.prompt, "completion": task.answer})
    return rows


# --------------------------------------------------------------------------------------------------
# Public API.


def generate(seed: int = 1234) -> dict[str, list]:
    """All demo files in memory: {relative path: rows}. No I/O.

    Rows are dicts for clean JSONL files and already-serialised lines (str) for the raw files, which hold
    malformed lines; DEFECTS.json is a one-element list holding the ledger.
    """
    tickets = _Tickets()
    support_gen, support_mc = _support_eval(_rng(seed, "support-eval"), tickets)
    general_gen, general_mc = _general_eval(_rng(seed, "general-eval"))
    evals = {SUPPORT_GEN: support_gen, SUPPORT_MC: support_mc, GENERAL_GEN: general_gen, GENERAL_MC: general_mc}
    texts = [t for rows in evals.values() for row in rows for t in eval_texts(row)]
    # Domain rows must contain no eval text at all. General rows inevitably contain one-word eval answers
    # ("Paris", "42"), so for them only eval texts of two or more words count.
    domain_gate = _Gate(EvalIndex(texts))
    multiword = EvalIndex(t for t in texts if len(words(t)) > 1)
    held_out = _held_out_keys(general_gen, general_mc)
    for row in support_gen + support_mc:
        domain_gate.reserve(row["message"])

    domain_lines, domain_ledger = _domain_raw(_rng(seed, "domain"), tickets, domain_gate, support_gen)
    pref_lines, pref_ledger = _preferences(_rng(seed, "preferences"), tickets, domain_gate)

    general_gate = _Gate(multiword)
    for row in general_gen + general_mc:
        general_gate.reserve(row["prompt"])
    general_lines, general_ledger = _general_raw(_rng(seed, "general"), general_gate, held_out, general_gen)

    return {
        PRETRAIN: _pretrain(_rng(seed, "pretrain"), multiword, held_out),
        RAW_DOMAIN: domain_lines,
        RAW_GENERAL: general_lines,
        RAW_PREFERENCES: pref_lines,
        LEDGER: [{"domain.jsonl": domain_ledger, "general.jsonl": general_ledger, "preferences.jsonl": pref_ledger}],
        **evals,
    }


def serialise(path: str, rows: list) -> bytes:
    """The exact bytes written for one file."""
    if path.endswith(".json"):
        return (json.dumps(rows[0], indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return "".join((row if isinstance(row, str) else _dumps(row)) + "\n" for row in rows).encode("utf-8")


def write(root: Path, seed: int = 1234) -> dict[str, str]:
    """Write every demo file under root (each atomically); returns {relative path: sha256 hex}."""
    digests = {}
    for rel, rows in generate(seed).items():
        data = serialise(rel, rows)
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


def main(argv: Sequence[str] | None = None) -> None:
    repo = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(prog="python -m demo.data", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=repo, help=f"where to write (default: {repo})")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    digests = write(args.root, args.seed)
    for rel, digest in digests.items():
        path = args.root / rel
        data = path.read_bytes()
        lines = data.count(b"\n")
        rows = "ledger" if rel.endswith(".json") else f"{lines:,} rows"
        print(f"{rel:34} {rows:>12} {len(data):>11,} bytes  sha256 {digest[:12]}")
    print(
        f"seed {args.seed}: {len(digests)} files under {args.root} in {time.perf_counter() - start:.1f}s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
