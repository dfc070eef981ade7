"""The demo's lookup variant: a task that retrieval already solves, so the gate refuses the fine-tune and names
the cheaper path.

    tunegate demo-lookup        # in the demo project: its data, eval task, gate policy, params and base revision
    dvc repro                   # FAIL target lookup_gen/exact vs retrieval-2 ... does not beat prompting with retrieval

The task: which warehouse an order ships from. Each of 240 orders ships from one of eight warehouses, drawn at
random: a fact per order, not a skill. The training rows ask about every order in three wordings; the eval asks
about 150 of the orders in a fourth. A fine-tune has to memorise 240 arbitrary pairs from 720 short rows; the base
shown the rows about the same order (BM25 finds them by the order number) has only to repeat their answer.

The demo base cannot use its context: it was pretrained on single chats that never refer back. The variant
publishes a revision of it that can, pretrained further on the general corpus interleaved with recall episodes:
chats about made-up keys (a locker, a seat, a bare number) whose label, asked again in other words later in the
same context, is the one given earlier. Never the warehouse task itself: what the base learns is to read its
context, which every real base model does. Its question forms include the lookup's own (with a locker or a seat
where the order would be): a 1M-parameter model does not carry the skill to wordings it never saw.
"""

from __future__ import annotations

import random
from pathlib import Path

from demo.data import CAPITALS, COLORS, NAMES, PRODUCTS
from tunegate.io import write_jsonl, write_text

ORDERS = 240
EVAL_ORDERS = 150
WAREHOUSES = ("Paris", "Rome", "Cairo", "Tokyo", "Accra", "Berlin", "Dublin", "Madrid")
TRAIN_TEMPLATES = (
    "Which warehouse holds order {n}?",
    "Where is order {n} kept?",
    "Order {n}: which warehouse has it?",
)
EVAL_TEMPLATE = "Which place holds order {n}?"

DATA = "data/raw/lookup.jsonl"
EVAL_DATA = "evals/data/lookup_gen.jsonl"
TASK = "evals/tasks/lookup_gen.yaml"
PROMPT = "evals/lookup_prompt.md"
POLICY = "evals/gates_lookup.yaml"
HUB = "models/demo-hub"
EPISODES = 6000  # recall episodes in the further pretraining corpus, between general chats
LR_SHARE = 1.0  # of the demo schedule's peak learning rate (3e-3, constant)
MODEL_NAME = "tunegate-lookup"

# The recall episodes of the base's further pretraining: keys it has never seen, labels it must copy.
RECALL_THINGS = ("locker", "seat", "room", "crate", "ticket", "badge", "desk", "card")
RECALL_TEMPLATES = (
    "What is the label of {key}?",
    "{key}: which label does it have?",
    "Remind me of the label for {key}.",
    "Tell me what {key} is called.",
    "Which name goes with {key}?",
    "Who looks after {key}?",
    "Which city is {key} in?",
    "Where is {key} kept?",
    "What colour is {key}?",
    "Who owns {key}?",
    "Which team has {key}?",
    "Where did {key} come from?",
    "{key} belongs to whom?",
    "Say the word for {key}.",
    "What goes with {key}?",
    "Which place holds {key}?",
)
LABELS = tuple(city for _, city in CAPITALS) + PRODUCTS + COLORS + NAMES

TASK_YAML = """\
# The lookup variant's target (demo/lookup.py): which warehouse an order ships from, one word, exact match.
include: _common.yaml
task: lookup_gen
dataset_kwargs:
  data_files:
    test: evals/data/lookup_gen.jsonl
output_type: generate_until
doc_to_text: "{{message}}"
doc_to_target: "{{answer}}"
target_delimiter: ""
generation_kwargs:
  until: ["<|end|>", "\\n"]
  do_sample: false
  max_gen_toks: 8
process_results: !function utils.exact
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
"""

PROMPT_TEXT = "Reply with the warehouse only.\n"

POLICY_YAML = """\
# The lookup variant's gate policy (demo/lookup.py): the demo's forgetting checks, the lookup task as the target,
# and the baselines the fine-tune must beat. Retrieval already answers this task: the gate is meant to fail.
confidence: 0.95
min_items: 30
checks:
  - {task: general_mc, metric: acc, role: general, margin: 0.06}
  - {task: general_gen, metric: exact, role: general, margin: 0.08}
  - {task: lookup_gen, metric: exact, role: target, min_gain: 0.10}
baselines:
  beat: true
  min_gain: 0.0
"""

PARAMS = {
    "base.model": HUB,
    "data.sources": {
        "domain": {"path": DATA, "role": "domain"},
        "general": {"path": "data/raw/general.jsonl", "role": "general"},
    },
    "paths.prompt": PROMPT,
    "eval.tasks": ["general_mc", "general_gen", "lookup_gen"],
    "baselines.tasks": ["lookup_gen"],
    "baselines.few_shot": 2,  # two examples and the question fill the demo base's 128 positions
    "baselines.retrieval": 2,
    "eval.max_gen_toks": 32,  # general_gen's own; the default 48 would leave room for one example
    "gate.policy": POLICY,
    "export.formats": [],
    "register.model_name": MODEL_NAME,
}


def _rng(seed: int, part: str) -> random.Random:
    return random.Random(f"{seed}/lookup/{part}")


def orders(seed: int) -> list[tuple[str, str]]:
    """(order number, warehouse) for every order; numbers unique, warehouses uniform."""
    rng = _rng(seed, "orders")
    numbers = rng.sample(range(10000, 100000), ORDERS)
    return [(str(n), rng.choice(WAREHOUSES)) for n in numbers]


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def training_rows(seed: int) -> list[dict]:
    """Every order in each training wording, shuffled (seeded)."""
    rows = [_chat(t.format(n=n), w) for n, w in orders(seed) for t in TRAIN_TEMPLATES]
    _rng(seed, "train").shuffle(rows)
    return rows


def eval_rows(seed: int) -> list[dict]:
    """EVAL_ORDERS of the orders, asked in the held-out wording."""
    picked = _rng(seed, "eval").sample(orders(seed), EVAL_ORDERS)
    return [
        {"id": f"lookup-{i:04d}", "message": EVAL_TEMPLATE.format(n=n), "answer": w}
        for i, (n, w) in enumerate(picked, 1)
    ]


def recall_corpus(general: list[dict], seed: int, episodes: int) -> list[dict]:
    """Pretraining rows (prompt, completion) in the order they are to be concatenated. Each recall episode is laid
    out as a retrieval prompt is: one to three chats giving keys their labels, then a question about a key in
    another wording; most of the time one or two of the chats before it were about that key (its label is the
    answer), otherwise none was (its label is new). General chats lie between the episodes."""
    rng = _rng(seed, "recall")
    rows: list[dict] = []

    def key() -> str:  # a bare number or a thing and its number
        number = str(rng.randint(100, 99999))
        return number if rng.random() < 0.5 else f"{rng.choice(RECALL_THINGS)} {number}"

    for _ in range(episodes):
        target, label = key(), rng.choice(LABELS)
        wordings = rng.sample(range(len(RECALL_TEMPLATES)), 3)
        shown = [(key(), rng.choice(LABELS), rng.randrange(len(RECALL_TEMPLATES))) for _ in range(rng.randint(0, 2))]
        if rng.random() < 0.85:
            about = [(target, label, wordings[i]) for i in range(rng.randint(1, 2))]
            shown = shown + about if rng.random() < 0.85 else about + shown
        for k, answer, wording in shown:
            rows.append({"prompt": RECALL_TEMPLATES[wording].format(key=k), "completion": answer})
        rows.append({"prompt": RECALL_TEMPLATES[wordings[2]].format(key=target), "completion": label})
        rows += rng.sample(general, rng.randint(0, 1))
    return rows


def write_files(root: Path, seed: int) -> list[str]:
    """The variant's data, eval task, prompt and gate policy under root (each written atomically)."""
    write_jsonl(root / DATA, training_rows(seed))  # the io writers make missing folders
    write_jsonl(root / EVAL_DATA, eval_rows(seed))
    texts = {TASK: TASK_YAML, PROMPT: PROMPT_TEXT, POLICY: POLICY_YAML}
    for rel, text in texts.items():
        write_text(root / rel, text)
    return [DATA, EVAL_DATA, *texts]


def set_params(path: Path, changes: dict) -> None:
    """Set dotted keys in a params file, keeping its comments, order and layout (ruamel's round trip): null stays
    null, lists and small mappings are written in flow style as the file writes them."""
    import io

    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    def flow(value):
        if isinstance(value, list):
            seq = CommentedSeq(flow(v) for v in value)
            seq.fa.set_flow_style()
            return seq
        if isinstance(value, dict):
            mapping = CommentedMap((k, flow(v)) for k, v in value.items())
            if not any(isinstance(v, dict) for v in value.values()):
                mapping.fa.set_flow_style()
            return mapping
        return value

    yaml = YAML()
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    params = yaml.load(path.read_text(encoding="utf-8"))
    for dotted, value in changes.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = flow(value)
    out = io.StringIO()
    yaml.dump(params, out)
    write_text(path, out.getvalue())
