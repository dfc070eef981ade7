"""tunegate init's pieces (carving, labels, scorer choice, dvc.yaml edit), the consistency checks that
run before compute, and the generic eval scorers."""

from __future__ import annotations

import json
import random
import re
import shutil
from collections import Counter

import pytest
import yaml

from tests.conftest import ROOT
from tunegate import consistency, project
from tunegate.config import load_config
from tunegate.errors import UserError
from tunegate.io import read_jsonl


def answers(rng: random.Random, n: int, labels=("refund", "track", "cancel"), weights=(6, 3, 1)) -> list[str]:
    return [
        json.dumps({"intent": rng.choices(labels, weights)[0], "order_id": str(rng.randint(10000, 99999))})
        for _ in range(n)
    ]


@pytest.mark.parametrize("seed", range(5))
def test_carve_is_seeded_and_stratified_in_proportion(seed):
    rng = random.Random(seed)
    items = [(f"q{i}", a) for i, a in enumerate(answers(rng, rng.randint(200, 600)))]
    size = rng.randint(30, 120)
    key = project.pick_label([a for _, a in items], None)
    assert key == "intent"  # the key with few values; order ids are all different
    chosen = project.carve(items, size, seed, key)
    assert chosen == project.carve(items, size, seed, key) and len(chosen) == len(set(chosen)) == size
    population = Counter(json.loads(a)["intent"] for _, a in items)
    held = Counter(json.loads(items[i][1])["intent"] for i in chosen)
    for label, count in population.items():  # every class within one item of its share
        assert abs(held[label] - size * count / len(items)) < 1.0001
    assert project.carve(items, size, seed + 1, key) != chosen


def test_labels_are_only_read_where_answers_have_them():
    assert project.pick_label(["plain text", "more text"], None) is None
    with pytest.raises(UserError, match="not all JSON objects"):
        project.pick_label(["plain text"], "intent")
    with pytest.raises(UserError, match="missing from 1 of 2"):
        project.pick_label(['{"intent": "a"}', '{"other": "b"}'], "intent")


def test_scorer_follows_the_answers():
    assert project.scorer(['{"a": 1}', '{"a": 2, "b": 3}'])[0] == "json_fields"
    assert project.scorer(["Paris", "41", "two words"])[0] == "exact"
    assert project.scorer(["a long answer with many words in it", "another one that goes on and on"])[2] == "chrf"


def test_validate_deps_are_added_once_and_comments_stay():
    text = (ROOT / "dvc.yaml").read_text()
    once = project.add_validate_deps(text, ["data/my.jsonl", "/abs/other.parquet"])
    assert project.add_validate_deps(once, ["data/my.jsonl"]) == once
    stages = yaml.safe_load(once)["stages"]
    assert stages["validate"]["deps"][-2:] == ["data/my.jsonl", "/abs/other.parquet"]
    assert once.splitlines()[0] == text.splitlines()[0]  # the header comment
    assert yaml.safe_load(text)["stages"]["dedup"] == stages["dedup"]


@pytest.fixture
def proj(tmp_path):
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "evals", tmp_path / "evals")
    (tmp_path / "data/raw").mkdir(parents=True)
    return tmp_path


def test_the_demo_is_consistent():
    cfg = load_config(ROOT / "params.yaml")
    assert consistency.problems(cfg, ROOT) == [] and consistency.warnings(cfg, ROOT) == []


def test_a_gate_check_on_a_task_that_is_not_run_is_named(proj):
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["eval"]["tasks"] = ["support_gen", "general_mc"]
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    found = consistency.gate_problems(load_config(proj / "params.yaml"), proj)
    assert [p.split(":")[1].strip() for p in found] == ["checks[1] (general_gen/exact)", "checks[2] (support_mc/acc)"]
    assert "not in eval.tasks" in found[0]


def test_a_metric_the_task_does_not_report_and_too_few_items_are_named(proj):
    policy = yaml.safe_load((proj / "evals/gates.yaml").read_text())
    policy["checks"][0]["metric"] = "accuracy"
    policy["min_items"] = 10_000
    (proj / "evals/gates.yaml").write_text(yaml.safe_dump(policy))
    found = consistency.gate_problems(load_config(proj / "params.yaml"), proj)
    assert "reports acc, not 'accuracy'" in found[0]
    assert sum("fewer than the policy's min_items 10000" in p for p in found) == 4


def test_a_data_file_dvc_does_not_track_is_named(proj):
    (proj / "data/mine.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["data"]["sources"]["domain"]["path"] = "data/mine.jsonl"
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config(proj / "params.yaml")
    [line] = consistency.data_problems(cfg, proj)
    assert line.startswith("data.sources.domain: data/mine.jsonl is not a dependency of the validate stage")
    (proj / "dvc.yaml").write_text(project.add_validate_deps((proj / "dvc.yaml").read_text(), ["data/mine.jsonl"]))
    assert consistency.data_problems(cfg, proj) == []


def test_max_length_shorter_than_validated_rows_is_a_warning_unless_truncating(proj):
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"]["args"]["max_length"] = 64
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    [line] = consistency.length_warnings(load_config(proj / "params.yaml"))
    assert "train.args.max_length 64 < validate.max_tokens 256" in line
    params["train"]["truncate"] = True
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    assert consistency.length_warnings(load_config(proj / "params.yaml")) == []


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("vllm") is not None, reason="vLLM installed: no warning to see here"
)
def test_vllm_asked_for_where_it_cannot_run_is_a_warning_of_check(proj):
    params = yaml.safe_load((proj / "params.yaml").read_text())
    assert consistency.runtime_warnings(load_config(proj / "params.yaml")) == []
    params["eval"]["backend"] = "vllm"
    params["train"] |= {"method": "grpo", "grpo_args": {"use_vllm": True}}
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    lines = consistency.runtime_warnings(load_config(proj / "params.yaml"))
    assert [line.split(":")[0] for line in lines] == ["eval.backend", "train.grpo_args.use_vllm"]
    assert all("vLLM installed (pip install vllm)" in line and "another machine" not in line for line in lines)
    assert lines[0].endswith(
        "set eval.backend: hf (the stage stops here unless the pipeline runs on a machine that has them)"
    )


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="a CUDA device: FlashAttention / Liger may run, no warning to see"
)
def test_flash_attention_and_liger_asked_for_where_they_cannot_run_are_warnings_of_check(proj):
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"] |= {"attn_implementation": "flash_attention_2", "kernels": "liger"}
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    lines = consistency.runtime_warnings(load_config(proj / "params.yaml"))
    assert [line.split(":")[0] for line in lines] == [
        "train.attn_implementation flash_attention_2",
        "train.kernels liger",
    ]
    assert "needs a CUDA device and flash-attn installed" in lines[0]
    assert "Liger's kernels run on CUDA only" in lines[1]
    assert all(line.endswith("unless the pipeline runs on a machine that has them)") for line in lines)


def test_init_refuses_to_overwrite_a_set_up_project(proj):
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["base"]["model"] = "org/model"
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match="already set up for org/model; `tunegate init --force`"):
        project.init("org/other", ["x.jsonl"], root=proj)


def test_init_with_a_hub_model_offline_is_one_line(proj, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"^--model nobody/no-such-model: not a local folder, and its tokenizer"):
        project.init("nobody/no-such-model", [str(ROOT / "data/raw/domain.jsonl")], root=proj)


def test_init_outside_a_project_or_with_a_folder_without_a_tokenizer_is_one_line(proj, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("elsewhere")
    with pytest.raises(UserError, match=r"not a tunegate project \(no params.yaml and dvc.yaml\)"):
        project.init("org/model", ["x.jsonl"], root=tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"the tokenizer cannot be loaded .*; check --model"):
        project.init(str(tmp_path / "empty"), [str(ROOT / "data/raw/domain.jsonl")], root=proj)


def test_scorers_read_the_references_own_keys():
    import importlib.util

    spec = importlib.util.spec_from_file_location("utils", ROOT / "evals/tasks/utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = {"answer": json.dumps({"intent": "refund", "order_id": "51973", "lang": "en"})}
    assert utils.json_fields(doc, ['{"intent": "refund", "order_id": 51973, "lang": "de", "x": 1}']) == {
        "json_exact": 0.0,
        "json_fields": 2 / 3,
    }
    assert utils.json_fields(doc, [doc["answer"]]) == {"json_exact": 1.0, "json_fields": 1.0}
    assert utils.json_fields(doc, ["not json"]) == {"json_exact": 0.0, "json_fields": 0.0}
    assert utils.exact({"answer": "Paris"}, [" Paris\n"]) == {"exact": 1.0}
    same = utils.text_overlap({"answer": "the parcel left the depot"}, ["the parcel left the depot"])
    assert same == {"chrf": 1.0, "rouge_l": 1.0}
    assert utils.rouge_l("a c d", "a b c d") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert utils.chrf("", "abc") == 0.0 and 0 < utils.chrf("the parcel", "the parcels") < 1
    # chrF weighs recall twice as much as precision (beta = 2): a short, correct prefix scores lower
    assert utils.chrf("the parcel", "the parcel left the depot") < utils.chrf(
        "the parcel left the depot today", "the parcel left the depot"
    )


def test_the_starting_prompt_follows_the_answers():
    rng = random.Random(0)
    json_prompt = project.starting_prompt(answers(rng, 20), "json_fields")
    assert "JSON object with the keys intent, order_id" in json_prompt
    labels = project.starting_prompt(["billing", "shipping", "billing", "returns"], "exact")
    assert labels == "Reply with exactly one of: billing, returns, shipping."
    free = project.starting_prompt(["word " * 30, "word " * 40, "word " * 50], "chrf")
    assert "about 40 words" in free


def test_baselines_on_a_task_that_is_not_run_or_without_their_prompt_are_named(proj):
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["baselines"]["tasks"] = ["support_gen", "general_mc", "nowhere"]
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    (proj / "evals/prompt.md").unlink()
    cfg = load_config(proj / "params.yaml")
    found = consistency.baseline_problems(cfg, proj)
    assert len(found) == 2 and "'nowhere' is not in eval.tasks" in found[0]
    assert found[1].startswith("evals/prompt.md: missing; write the instructions")
    assert consistency.baseline_warnings(cfg, proj) == [
        "baselines.tasks: general_mc is not a target check in evals/gates.yaml; its baselines decide nothing"
    ]
    params["baselines"]["prompt"] = False
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    assert len(consistency.baseline_problems(load_config(proj / "params.yaml"), proj)) == 1


@pytest.mark.parametrize(
    "path, name",
    [("data/my_tickets.jsonl", "my_tickets_gen"), ("data/support/train.jsonl", "support_gen"),
     ("exports/billing/data/train.jsonl", "billing_gen"), ("data/train.jsonl", "target_gen"),
     ("/abs/data/raw/train.jsonl", "target_gen")],
)  # fmt: skip
def test_the_task_is_named_after_the_data_not_a_generic_word(path, name):
    assert project.task_name(path) == name


def test_every_file_given_to_init_is_a_source_of_its_own(tmp_path):
    """Two exports both called train.jsonl, a general file and a preference file of that name too: each is a source,
    named after what its path says (the folder when the file's name says nothing), numbered where names meet; a file
    named twice is read once, and init says so."""
    plan = project.Plan()
    data = ["data/a/train.jsonl", "data/b/train.jsonl", "data/support.jsonl", "old/support.jsonl"]
    got = project._sources(data, ["g/train.jsonl"], ["prefs/train.jsonl", "./data/a/train.jsonl"], tmp_path, plan)
    assert got == {
        "a": {"path": "data/a/train.jsonl", "role": "domain"},
        "b": {"path": "data/b/train.jsonl", "role": "domain"},
        "support": {"path": "data/support.jsonl", "role": "domain"},
        "support_2": {"path": "old/support.jsonl", "role": "domain"},
        "g": {"path": "g/train.jsonl", "role": "general"},
        "prefs": {"path": "prefs/train.jsonl", "role": "preference"},
    }
    assert plan.lines == ["./data/a/train.jsonl: named twice; read once, as the domain source a"]
    assert project._each_once([*data, "./data/b/train.jsonl", "data/a/../a/train.jsonl"]) == data  # the rows read
    assert project.source_name("data/train.jsonl", {"train"}) == "train_2"  # nothing says more: the file's own name


def test_short_label_answers_are_stratified_by_the_answer(seed=3):
    rng = random.Random(seed)
    items = [(f"q{i}", rng.choices(["billing", "shipping", "returns", "fraud"], [60, 30, 8, 2])[0]) for i in range(500)]
    answers = [a for _, a in items]
    assert project.short_labels(answers) and project.pick_label(answers, None) is None
    chosen = project.carve(items, 50, seed, project.ANSWER)
    counts = Counter(items[i][1] for i in chosen)
    total = Counter(answers)
    for value, n in total.items():  # each class in proportion (largest remainder): within one item
        assert abs(counts[value] - 50 * n / len(items)) < 1, (value, counts)
    assert counts["fraud"] >= 1  # the rare class is in the eval
    assert not project.short_labels(["a long free text answer here", "another long free text answer"])
    assert not project.short_labels(['{"a": 1}', '{"a": 2}']) and not project.short_labels(["yes"] * 10)


def test_check_finds_a_builtin_task_whose_data_is_not_here_before_any_stage_runs(proj, monkeypatch):
    """Offline with an empty Hugging Face cache, a built-in lm-eval task is named with the fix by `tunegate check`
    (instead of eval_base retrying the hub after training); a local task whose data file is gone is named too."""
    from typer.testing import CliRunner

    from tunegate.cli import app

    monkeypatch.setenv("HF_HOME", str(proj / "empty-hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(proj / "empty-hf-home" / "hub"))
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["eval"]["tasks"] += ["arc_easy"]
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    (proj / "evals/data/general_gen.jsonl").unlink()
    monkeypatch.chdir(proj)
    out = CliRunner().invoke(app, ["check"])
    assert out.exit_code == 2
    assert (
        "eval.tasks: arc_easy needs the dataset allenai/ai2_arc (ARC-Easy), which is not in the Hugging Face cache"
        in out.output
    )
    assert "lm_eval --model hf --model_args pretrained=demo --tasks arc_easy --limit 1" in out.output
    assert "eval.tasks: general_gen reads" in out.output and "which does not exist" in out.output
    cached = proj / "empty-hf-home" / "hub" / "datasets--allenai--ai2_arc"
    cached.mkdir(parents=True)
    assert not any("arc_easy" in p for p in consistency.task_data_problems(load_config(proj / "params.yaml"), proj)[0])


def test_check_accepts_every_task_lm_eval_knows_and_names_the_others():
    """`tunegate check` names an eval task that is neither local nor lm-eval's (the stage would stop on it only after
    the base was built). Every name lm-eval's own index holds (tasks, groups, tags) is accepted, and nearly all of
    them from the quick index, without lm-eval's 10 s of indexing."""
    tasks_dir = ROOT / "evals/tasks"
    every = consistency._lm_eval_tasks(str(tasks_dir.resolve()))
    local = consistency.local_task_info(tasks_dir, ROOT)
    asked = [*sorted(every), "support_gen", "no_such_task", "mmlu_but_not_quite"]
    assert consistency.unknown_tasks(asked, tasks_dir, local) == ["no_such_task", "mmlu_but_not_quite"]
    quick = consistency._builtin_index()[1]
    assert {"mmlu", "arc_easy", "hellaswag", "leaderboard"} <= quick  # a group, tasks, a group of groups
    assert len(every - quick - set(local)) < 0.01 * len(every)
    line = consistency.unknown_tasks_line(["no_such_task"], tasks_dir)
    assert line.startswith("eval.tasks: unknown task(s) no_such_task (") and "\n" not in line


def test_preference_files_choose_the_method_after_sft(tmp_path):
    """Pairs -> SFT then DPO; a file of labelled answers (prompt, completion, label) -> SFT then KTO, which reads
    them (and any pairs beside them), with the preference learning rate in its own overrides."""
    pairs, labelled = tmp_path / "pairs.jsonl", tmp_path / "feedback.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    labelled.write_text(json.dumps({"prompt": "q", "completion": "a", "label": True}) + "\n")
    plan = project.Plan()
    assert project._preference_method([], plan) == (None, [])
    method, answered = project._preference_method([str(pairs)], plan)
    assert method == "dpo" and not plan.lines
    assert [[m["content"] for m in c["messages"]] for c in answered] == [["q", "a"], ["q", "b"]]
    assert project._preference_method([str(pairs), str(labelled)], plan)[0] == "kto"
    assert plan.lines == [f"train: sft then kto: {labelled} holds labelled answers, which KTO reads (DPO needs pairs)"]
    held = project._HeldOut("support", 10, ['{"a": 1}'], "json_fields")
    for second, overrides in (("kto", "kto_args"), ("dpo", "dpo_args"), (None, None)):
        train: dict = {}
        project._train_params(train, "m", 256, second, held)
        assert train["method"] == (f"sft+{second}" if second else "sft")
        assert [k for k in ("dpo_args", "kto_args") if train[k]] == ([overrides] if overrides else [])


@pytest.fixture(scope="module")
def gemma_like(tmp_path_factory):
    """A tiny base whose chat template refuses a system turn, as Gemma's does."""
    from tests.tiny import build_base, tiny

    folder = tmp_path_factory.mktemp("gemma-like")
    build_base(folder, tiny(max_position=256))
    (folder / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\n' + m['content'] + '<end_of_turn>\n' }}"
        "{% endfor %}"
    )
    return folder


def _tickets(path, n: int, system: bool) -> str:
    lines = []
    for i in range(n):
        turns = [{"role": "system", "content": "Classify the ticket. " * 20}] if system and i % 2 else []
        turns += [
            {"role": "user", "content": f"Ticket {i}: parcel {i} is late"},
            {"role": "assistant", "content": ("late", "lost", "damaged")[i % 3]},  # a label to stratify by
        ]
        lines.append(json.dumps({"messages": turns}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_init_measures_rows_as_validate_will_fold_them_for_a_template_without_a_system_turn(proj, gemma_like):
    """A template that raises on a system turn: init says validate folds it, and measures the folded rows (the long
    system text counted), instead of stopping on the template's traceback."""
    data = _tickets(proj / "data/raw/tickets.jsonl", 60, system=True)
    plan = project.init(str(gemma_like), [data], general_tasks=["general_mc"], root=proj)
    said = project.summary(plan)
    assert "template: the chat template refuses a system turn (System role not supported): validate folds it" in said
    plain = _tickets(proj / "data/raw/plain.jsonl", 60, system=False)
    other = project.init(str(gemma_like), [plain], general_tasks=["general_mc"], root=proj, force=True)
    assert "template:" not in project.summary(other)
    longest = [int(re.search(r"longest row (\d+) tokens", project.summary(p))[1]) for p in (plan, other)]
    assert longest[0] > longest[1] + 20


def test_check_says_that_the_base_template_refuses_a_system_turn(proj, gemma_like, tmp_path):
    """`tunegate check` reads base.model's chat template (chat_template.jinja, or tokenizer_config.json's, named
    templates included) and says before any run that rows' system turns will be folded; a template that takes a
    system turn, or a base whose template is not here, gets no such line."""
    data = _tickets(proj / "data/raw/tickets.jsonl", 60, system=True)
    project.init(str(gemma_like), [data], general_tasks=["general_mc"], root=proj)
    cfg = load_config(proj / "params.yaml")
    said = [w for w in consistency.warnings(cfg, proj) if "chat template" in w]
    assert said == [
        f"base.model {gemma_like}: its chat template refuses a system turn (System role not supported): validate "
        "folds each row's system turn into its first user turn, and every eval asks the same way "
        "(docs/data.md#chat-templates-that-refuse-a-role-order)"
    ]
    named = tmp_path / "named"
    shutil.copytree(gemma_like, named)
    template = (named / "chat_template.jinja").read_text()
    (named / "chat_template.jinja").unlink()
    config = json.loads((named / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "{{ messages }}"},
        {"name": "default", "template": template},
    ]
    (named / "tokenizer_config.json").write_text(json.dumps(config))
    other = cfg.model_copy(update={"base": cfg.base.model_copy(update={"model": str(named)})})
    assert len([w for w in consistency.warnings(other, proj) if "refuses a system turn" in w]) == 1
    config["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (named / "tokenizer_config.json").write_text(json.dumps(config))
    assert not [w for w in consistency.warnings(other, proj) if "chat template" in w]
    hub = cfg.model_copy(update={"base": cfg.base.model_copy(update={"model": "org/not-here"})})
    assert not [w for w in consistency.warnings(hub, proj) if "chat template" in w]


def test_init_on_a_template_that_refuses_every_row_is_one_line(proj, gemma_like, tmp_path):
    import shutil

    base = tmp_path / "refuses-all"
    shutil.copytree(gemma_like, base)
    (base / "chat_template.jinja").write_text("{{ raise_exception('This model has no chat format') }}")
    data = _tickets(proj / "data/raw/tickets.jsonl", 60, system=False)
    with pytest.raises(UserError, match=r"^the chat template refuses every row of your data \(This model has no chat"):
        project.init(str(base), [data], general_tasks=["general_mc"], root=proj)


@pytest.mark.parametrize("system", [True, False])
def test_held_out_items_keep_their_rows_system_turn(proj, gemma_like, system):
    """Rows trained with a system turn are asked with it: each held-out item keeps its row's (every other row here
    has one), and the task names the field as lm-eval's `description`; data without any writes neither."""
    data = _tickets(proj / "data/raw/tickets.jsonl", 60, system=system)
    plan = project.init(str(gemma_like), [data], general_tasks=["general_mc"], root=proj, eval_size=30)
    items = read_jsonl(proj / "evals/data/tickets_gen.jsonl")
    task = yaml.safe_load((proj / "evals/tasks/tickets_gen.yaml").read_text().replace("!function ", ""))
    rows = {json.loads(line)["messages"][-2]["content"]: json.loads(line) for line in open(data)}
    if system:
        assert task["description"] == "system" and "each asked with its system turn" in project.summary(plan)
        for item in items:
            turns = rows[item["prompt"]]["messages"]
            assert item["system"] == (turns[0]["content"] if len(turns) == 3 else "")
        assert {bool(item["system"]) for item in items} == {True, False}
    else:
        assert "description" not in task and all("system" not in item for item in items)


def _conversations(path, n: int) -> str:
    """Multi-turn rows only (as a ShareGPT export of chats has them): two to four exchanges each, a system turn on
    every other row, every turn naming its row."""
    lines = []
    for i in range(n):
        turns = [{"role": "system", "content": f"Desk {i}: classify the ticket."}] if i % 2 else []
        for k in range(2 + i % 3):
            turns += [
                {"role": "user", "content": f"Ticket {i}, message {k}: parcel {i} is late again"},
                {"role": "assistant", "content": ("late", "lost", "damaged")[(i + k) % 3]},
            ]
        lines.append(json.dumps({"messages": turns}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_items_are_held_out_of_multi_turn_conversations_with_their_earlier_turns(proj, gemma_like):
    """Data of multi-turn rows only: init holds out rows' last exchanges, each item keeping its earlier exchanges and
    system turn as its row had them, and writes a task that asks them after those turns (utils.EarlierTurns, as many
    few-shot turns as the longest history). dedup then drops exactly the held-out conversations from training."""
    from stages.dedup import _eval_leaks, eval_items
    from tunegate.formats import load_source

    data = _conversations(proj / "data/raw/chats.jsonl", 90)
    plan = project.init(str(gemma_like), [data], general_tasks=["general_mc"], root=proj, eval_size=30)
    items = read_jsonl(proj / "evals/data/chats_gen.jsonl")
    text = (proj / "evals/tasks/chats_gen.yaml").read_text()
    task = yaml.safe_load(text.replace("!function ", ""))
    assert len(items) == 30 and task["num_fewshot"] == max(len(item["history"]) for item in items) == 3
    assert task["fewshot_split"] == "test" and task["fewshot_config"]["sampler"] == "utils.EarlierTurns"
    assert "its earlier turns (30 items)" in project.summary(plan)
    rows = {json.loads(line)["messages"][-2]["content"]: json.loads(line)["messages"] for line in open(data)}
    for item in items:
        turns = rows[item["prompt"]]
        system = turns[0]["content"] if turns[0]["role"] == "system" else ""
        earlier = turns[1 if system else 0 : -2]
        assert item["system"] == system and item["answer"] == turns[-1]["content"]
        assert item["history"] == [
            {"user": u["content"], "assistant": a["content"]} for u, a in zip(earlier[::2], earlier[1::2], strict=True)
        ]
    cfg = load_config(proj / "params.yaml")
    read, _, _ = load_source("chats", data)
    leaks = _eval_leaks(cfg.dedup, read, eval_items(proj / "evals/data"))
    assert {read[i]["messages"][-2]["content"] for i in leaks} == {item["prompt"] for item in items}


def test_init_on_rows_that_all_carry_tools_says_why_none_is_held_out(proj, gemma_like):
    """Function-calling data (a tools list on every row): no row can be asked as a text prompt, and the line says so
    instead of only counting the plain rows."""
    tool = {"type": "function", "function": {"name": "track", "parameters": {"type": "object", "properties": {}}}}
    path = proj / "data/raw/calls.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Where is {i}?"}, {"role": "assistant", "content": "Here."}]}
        for i in range(80)
    ]
    path.write_text("".join(json.dumps({**row, "tools": [tool]}) + "\n" for row in rows))
    with pytest.raises(UserError, match=r"0 rows are plain .* \(80 rows have tools or tool calls, which are not held"):
        project.init(str(gemma_like), [str(path)], general_tasks=["general_mc"], root=proj)


def test_lengths_hold_the_preference_rows_so_validate_keeps_them(proj, gemma_like):
    """validate.max_tokens is sized from the preference rows too (each answer after its prompt): pairs whose answers
    are longer than any domain row are kept by the validate that init configured, not quarantined as `length`."""
    from stages import validate
    from tunegate.config import load_config
    from tunegate.models import load_tokenizer

    data = _tickets(proj / "data/raw/tickets.jsonl", 60, system=False)
    long = " ".join(["the parcel was left at the wrong door and the driver did not ring"] * 12)
    prefs = proj / "data/raw/prefs.jsonl"
    prefs.write_text(
        "".join(json.dumps({"prompt": f"Ticket {i}", "chosen": long, "rejected": "No."}) + "\n" for i in range(20))
    )
    plan = project.init(str(gemma_like), [data], preferences=[str(prefs)], general_tasks=["general_mc"], root=proj)
    assert "(preference rows included)" in project.summary(plan)
    cfg = load_config(proj / "params.yaml")
    tokenizer = load_tokenizer({"path": str(gemma_like)}, False)
    source = {"prefs": cfg.data.sources["prefs"].model_copy(update={"path": str(prefs)})}
    metrics = validate.run(cfg.validate_, source, tokenizer, proj / "out")
    assert metrics["sources"]["prefs"]["kept"] == 20 and cfg.validate_.max_tokens > 256
