"""The default instruction tasks: FLAN-style examples generated from the shipped lexicon.

Each :class:`Task` draws an *instance* (e.g. ``{"a": 12, "b": 7}``) and renders it
through one of several input/target templates, zero-shot or few-shot, into a record
``{"inputs", "targets", "task_name", "template_type"}``; ``template_type`` is FLAN's
``zs_noopt``/``zs_opt``/``fs_noopt``/``fs_opt`` ("opt" = the answer options are listed).

Splits are by instance, never by example: an instance belongs to ``test`` if a hash of
(task, instance) is 0 mod 10, to ``validation`` if 1, else to ``train``; so no test
answer is ever seen in training, and few-shot exemplars always come from train instances.

Held-out tasks (:data:`HELDOUT_TASKS`) are never in a training shard: evaluation
finetunes on them briefly to measure whether a version is a better starting point.
Every task's answer is a function of its input that copying the input does not give.

Build all files with :func:`build_default_tasks` (cached by content hash) or read one
split with :func:`load_task_split`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .cache import cached_dir, content_hash
from .lexicon import DAYS_IN_MONTH, LEXICON_SOURCES, load_lexicon, number_to_words, upper_case_words

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Task:
    """One task: ``draw(rng) -> instance`` and templates over the instance's fields (``answer`` is the target)."""

    name: str
    draw: Callable[[random.Random], dict]
    templates: tuple[tuple[str, str], ...]
    options: tuple[str, ...] | None = None
    #: "instance": an instance is in one split whatever the template (large instance spaces);
    #: "template": the (instance, template) pair is (small lexicon tasks: every word is
    #: seen in training, but never with the test template).
    split_by: str = "instance"


def _nouns(r, k):
    return r.sample(list(load_lexicon()["nouns"]), k)


def _add(r):
    # Half one-digit sums (what a person asks first, "What is 3 plus 4?"), half up to 49 + 49.
    top = r.choice((9, 49))
    a, b = r.randint(0, top), r.randint(0, top)
    return {"a": a, "b": b, "answer": str(a + b)}


def _subtract(r):
    a, b = sorted((r.randint(0, 99), r.randint(0, 99)), reverse=True)
    return {"a": a, "b": b, "answer": str(a - b)}


def _reverse(r):
    # Nouns and colours, so that lists like "red blue green" are in the instance space.
    lex = load_lexicon()
    w = r.sample(list(lex["nouns"]) + list(lex["colors"]), r.randint(3, 5))
    return {"x": " ".join(w), "answer": " ".join(reversed(w))}


def _sort(r):
    nums = [r.randint(0, 9) for _ in range(r.randint(3, 6))]
    return {"x": " ".join(map(str, nums)), "answer": " ".join(map(str, sorted(nums)))}


def _count(r):
    w = [r.choice(list(load_lexicon()["nouns"])) for _ in range(r.randint(2, 9))]
    return {"x": " ".join(w), "answer": str(len(w))}


def _upper(r):
    w = r.sample(upper_case_words(), r.randint(1, 3))
    return {"x": " ".join(w), "answer": " ".join(w).upper()}


def _antonym(r):
    a, b = r.choice(list(load_lexicon()["adjectives"].items()))
    a, b = (a, b) if r.random() < 0.5 else (b, a)
    return {"x": a, "answer": b}


def _plural(r):
    s, p = r.choice(list(load_lexicon()["nouns"].items()))
    return {"x": s, "answer": p}


def _past(r):
    v, p = r.choice(list(load_lexicon()["verbs"].items()))
    return {"x": v, "answer": p}


def _spell_number(r):
    n = r.randint(0, 99)
    return {"x": n, "answer": number_to_words(n)}


def _date(r):
    months = load_lexicon()["months"]
    y, m = r.randint(1950, 2049), r.randrange(12)
    d = r.randint(1, DAYS_IN_MONTH[m])
    return {"x": f"{y}-{m + 1:02d}-{d:02d}", "answer": f"{months[m]} {d}, {y}"}


def _max(r):
    nums = [r.randint(0, 99) for _ in range(r.randint(3, 5))]
    return {"x": ", ".join(map(str, nums)), "answer": str(max(nums))}


def _sum_in_words(r):
    # add, then spell_number: two seen skills asked together, never trained together.
    a, b = r.randint(0, 49), r.randint(0, 49)
    return {"a": a, "b": b, "answer": number_to_words(a + b)}


def _plural_list(r):
    # plural, over a list of words as reverse_words and uppercase take them.
    items = r.sample(list(load_lexicon()["nouns"].items()), r.randint(2, 3))
    return {"x": " ".join(s for s, _ in items), "answer": " ".join(p for _, p in items)}


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "add",
            _add,
            (
                ("What is {a} plus {b}?", "{answer}"),
                ("Add {a} and {b}.", "{answer}"),
                ("Compute: {a} + {b} =", "{answer}"),
            ),
        ),
        Task(
            "subtract",
            _subtract,
            (
                ("What is {a} minus {b}?", "{answer}"),
                ("Subtract {b} from {a}.", "{answer}"),
                ("Compute: {a} - {b} =", "{answer}"),
            ),
        ),
        Task(
            "reverse_words",
            _reverse,
            (
                ("Reverse the order of the words: {x}", "{answer}"),
                ("Reverse the words: {x}", "{answer}"),
                ("Write these words backwards: {x}", "{answer}"),
                ("{x}\nReversed:", "{answer}"),
            ),
        ),
        Task(
            "sort_numbers",
            _sort,
            (
                ("Sort from smallest to largest: {x}", "{answer}"),
                ("Put these numbers in order: {x}", "{answer}"),
                ("{x}\nSorted:", "{answer}"),
            ),
        ),
        Task(
            "count_words",
            _count,
            (
                ("How many words are in this list? {x}", "{answer}"),
                ("Count the words: {x}", "{answer}"),
                ("{x}\nNumber of words:", "{answer}"),
            ),
        ),
        Task(
            "uppercase",
            _upper,
            (
                ("Write in capital letters: {x}", "{answer}"),
                ("Convert to upper case: {x}", "{answer}"),
                ("Uppercase: {x}", "{answer}"),
                ("{x}\nIn capitals:", "{answer}"),
            ),
        ),
        Task(
            "antonym",
            _antonym,
            (
                ("What is the opposite of {x}?", "{answer}"),
                ("Give an antonym of the word {x}.", "{answer}"),
                ("{x} is the opposite of", "{answer}"),
            ),
            split_by="template",
        ),
        Task(
            "plural",
            _plural,
            (
                ("What is the plural of {x}?", "{answer}"),
                ("One {x}, two ...", "{answer}"),
                ("Write the plural form: {x}", "{answer}"),
            ),
            split_by="template",
        ),
        Task(
            "past_tense",
            _past,
            (
                ("What is the past tense of {x}?", "{answer}"),
                ("Today I {x}; yesterday I ...", "{answer}"),
                ("Past tense: {x}", "{answer}"),
            ),
            split_by="template",
        ),
        Task(
            "spell_number",
            _spell_number,
            (
                ("Write {x} in words.", "{answer}"),
                ("How is the number {x} written?", "{answer}"),
                ("{x} in words:", "{answer}"),
            ),
            split_by="template",
        ),
        Task(
            "date_format",
            _date,
            (
                ("Write the date {x} in words.", "{answer}"),
                ("Convert {x} to month day, year.", "{answer}"),
                ("{x} is the date", "{answer}"),
            ),
        ),
        Task(
            "max_number",
            _max,
            (
                ("Which number is the largest: {x}?", "{answer}"),
                ("Find the maximum of {x}.", "{answer}"),
                ("{x}\nLargest:", "{answer}"),
            ),
        ),
        Task(
            "sum_in_words",
            _sum_in_words,
            (
                ("Write the sum of {a} and {b} in words.", "{answer}"),
                ("What is {a} plus {b}, written in words?", "{answer}"),
                ("{a} + {b} in words:", "{answer}"),
            ),
        ),
        Task(
            "plural_list",
            _plural_list,
            (
                ("Write the plural of each word: {x}", "{answer}"),
                ("Make every word plural: {x}", "{answer}"),
                ("{x}\nIn the plural:", "{answer}"),
            ),
        ),
    ]
}
#: Never in a training shard; evaluation finetunes on them briefly ("better starting point"). Each
#: composes what seen tasks teach: max_number the order sort_numbers learns, sum_in_words add then
#: spell_number, plural_list plural over a word list. They replace next_item (5 distinct test
#: questions, on day and month order no seen task teaches) and compare (a yes/no, half right by chance).
HELDOUT_TASKS: tuple[str, ...] = ("max_number", "sum_in_words", "plural_list")
SEEN_TASKS: tuple[str, ...] = tuple(sorted(n for n in TASKS if n not in HELDOUT_TASKS))


@dataclass(frozen=True)
class TaskConfig:
    """Sizes and seeds of the generated task files."""

    # 20000, not 1000: the long preset's 8 rounds draw ~9300 examples of each task per worker, and
    # with 1000 the model memorised them (v7: uppercase train exact match 0.90, test 0.12).
    train_per_task: int = field(default=20000, metadata={"help": "train examples per task"})
    validation_per_task: int = field(default=100, metadata={"help": "validation examples per task"})
    test_per_task: int = field(default=100, metadata={"help": "test examples per task"})
    fewshot_fraction: float = field(default=0.3, metadata={"help": "share of few-shot (fs_*) examples"})
    max_shots: int = field(default=2, metadata={"help": "few-shot exemplars: 1..max_shots"})
    seed: int = field(default=0, metadata={"help": "generation seed"})


def hash_split(key) -> str:
    """A split decided by a hash of ``key`` (any JSON value): 10% test, 10% validation, 80% train.
    The same on every machine and for every order the data comes in."""
    text = json.dumps(key, sort_keys=True)
    h = int.from_bytes(hashlib.sha1(text.encode()).digest()[:4], "big") % 10
    return "test" if h == 0 else ("validation" if h == 1 else "train")


def instance_split(task_name: str, instance: dict, template_index: int | None = None) -> str:
    """Which split an instance (with ``template_index`` for ``split_by="template"`` tasks) belongs to."""
    return hash_split([task_name, instance, template_index])


def _draw_in(task: Task, split: str, r: random.Random, template_index: int | None = None) -> tuple[dict, int]:
    """An ``(instance, template_index)`` of ``split``, with the given template if one is fixed."""
    n = len(task.templates)
    for _ in range(100000):
        inst = task.draw(r)
        if task.split_by == "template":
            ok = [t for t in range(n) if instance_split(task.name, inst, t) == split]
        else:
            ok = list(range(n)) if instance_split(task.name, inst) == split else []
        if template_index is not None:
            ok = [t for t in ok if t == template_index]
        if ok:
            return inst, r.choice(ok)
    raise RuntimeError(f"task {task.name} has no instance in split {split}")


def _render(task: Task, template: tuple[str, str], inst: dict) -> tuple[str, str]:
    inp = template[0].format(**inst)
    if task.options:
        inp += "\nOPTIONS:\n" + "\n".join(f"- {o}" for o in task.options)
    return inp, template[1].format(**inst)


def render_example(task: Task, split: str, r: random.Random, config: TaskConfig) -> dict:
    """One FLAN-style record of ``task`` from an instance of ``split``."""
    inst, ti = _draw_in(task, split, r)
    template = task.templates[ti]
    inp, tgt = _render(task, template, inst)
    fewshot = r.random() < config.fewshot_fraction
    if fewshot:
        shots = [
            _render(task, template, _draw_in(task, "train", r, ti)[0])
            for _ in range(r.randint(1, config.max_shots))
        ]
        inp = "\n\n".join(f"{i}\n{t}" for i, t in shots) + "\n\n" + inp
    kind = ("fs" if fewshot else "zs") + ("_opt" if task.options else "_noopt")
    return {"inputs": inp, "targets": tgt, "task_name": task.name, "template_type": kind}


def generate_split(task_name: str, split: str, config: TaskConfig = TaskConfig()) -> Iterator[dict]:
    """Stream the records of one task split (deterministic in the config's seed)."""
    task = TASKS[task_name]
    n = {
        "train": config.train_per_task,
        "validation": config.validation_per_task,
        "test": config.test_per_task,
    }[split]
    r = random.Random(f"{config.seed}/{task_name}/{split}")
    for _ in range(n):
        yield render_example(task, split, r, config)


def tasks_key(config: TaskConfig) -> str:
    return content_hash(Path(__file__), *LEXICON_SOURCES, asdict(config))


def build_default_tasks(config: TaskConfig = TaskConfig(), cache_dir=None) -> Path:
    """Write ``<task>/<split>.jsonl`` for every task under a cached dir and return the dir."""

    def build(tmp: Path) -> None:
        for name in TASKS:
            (tmp / name).mkdir()
            for split in SPLITS:
                with open(tmp / name / f"{split}.jsonl", "w", encoding="utf-8") as f:
                    for rec in generate_split(name, split, config):
                        f.write(json.dumps(rec) + "\n")
        meta = {"heldout": list(HELDOUT_TASKS), "seen": list(SEEN_TASKS), "config": asdict(config)}
        (tmp / "tasks.json").write_text(json.dumps(meta, indent=1))

    return cached_dir("tasks", tasks_key(config), build, cache_dir)


def load_task_split(
    task_name: str, split: str, config: TaskConfig = TaskConfig(), cache_dir=None
) -> list[dict]:
    """All records of one task split, from the cache (built on first use)."""
    if task_name not in TASKS:
        raise KeyError(f"unknown task {task_name!r}; tasks: {sorted(TASKS)}")
    path = build_default_tasks(config, cache_dir) / task_name / f"{split}.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]
