"""Loading data: pretraining text, instruction records, and shard specs.

Formats
-------
Pretraining text (one *document* each):

* ``.txt``: documents are separated by blank lines (lines of a paragraph are joined);
* ``.jsonl``: one ``{"text": ...}`` object per line;
* ``.parquet``: a ``text`` column (read a row group at a time).

Instruction records, all normalised to ``{"inputs", "targets", "task_name", "template_type"}``
(``.jsonl`` one object per line, or ``.parquet`` rows with the same fields):

* FLAN ``{"inputs", "targets"}`` (``task_name``/``template_type`` kept if present);
* Alpaca ``{"instruction", "input", "output"}`` (``input`` may be empty or absent);
* ShareGPT ``{"conversations": [{"from", "value"}, ...]}`` and chat
  ``{"messages": [{"role", "content"}, ...]}``: every assistant turn becomes one record
  whose inputs are the turns before it (see :func:`render_turns`).

Files are streamed line by line (Parquet by row group). A malformed line (bad JSON, a
shape none of the formats match, an empty target) is reported as ``path:line: why``:
with ``on_error="skip"`` it is logged as a warning and counted in the :class:`LoadReport`,
with ``on_error="raise"`` it raises :class:`DataError`. Nothing is dropped silently.

Shard specs (docs/INTERFACES.md) are resolved by :func:`resolve_shard`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("coldswarm.lm.data")

CORPUS_SUFFIXES = (".txt", ".jsonl", ".parquet")
INSTRUCTION_SUFFIXES = (".jsonl", ".parquet")


class DataError(ValueError):
    """A malformed input; the message names the file and line (or Parquet row)."""


@dataclass
class LoadReport:
    """What a load saw: records yielded and every problem reported (``path:line: why``)."""

    records: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.errors)


def _problem(msg: str, on_error: str, report: LoadReport | None) -> None:
    if on_error == "raise":
        raise DataError(msg)
    if on_error != "skip":
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    log.warning("skipping malformed record: %s", msg)
    if report is not None:
        report.errors.append(msg)


# ------------------------------------------------------------------------------- records


def iter_jsonl(
    path: str | os.PathLike, on_error: str = "skip", report: LoadReport | None = None
) -> Iterator[tuple[int, dict]]:
    """``(line_number, object)`` for each non-blank line of a JSONL file (1-based lines)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                _problem(f"{path}:{lineno}: invalid JSON ({e.msg})", on_error, report)
                continue
            if not isinstance(obj, dict):
                _problem(
                    f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}", on_error, report
                )
                continue
            yield lineno, obj


def iter_parquet_rows(
    path: str | os.PathLike, columns: list[str] | None = None
) -> Iterator[tuple[int, dict]]:
    """``(row_number, row)`` of a Parquet file, one row group in memory at a time (1-based rows)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(str(path))
    n = 0
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        for row in batch.to_pylist():
            n += 1
            yield n, row


ROLE_NAMES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}


def render_turns(turns: list[tuple[str, str]]) -> str:
    """The inputs for an assistant turn: a single user turn as is; anything longer as
    ``"System: ...\\nUser: ...\\nAssistant: ..."`` lines, so the model sees who said what."""
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    return "\n".join(f"{role.capitalize()}: {text}" for role, text in turns)


def _dialogue_records(turns: list[tuple[str, str]], fmt: str) -> list[dict]:
    out = []
    for i, (role, text) in enumerate(turns):
        if role == "assistant":
            if i == 0:
                raise ValueError("assistant turn with no turn before it")
            out.append({"inputs": render_turns(turns[:i]), "targets": text, "template_type": fmt})
    if not out:
        raise ValueError("no assistant turn")
    return out


def _turns(items, role_key: str, text_key: str) -> list[tuple[str, str]]:
    if not isinstance(items, list) or not items:
        raise ValueError("conversation must be a non-empty list")
    turns = []
    for t in items:
        if not isinstance(t, dict) or not isinstance(t.get(text_key), str):
            raise ValueError(f"each turn needs a string {text_key!r}")
        role = ROLE_NAMES.get(str(t.get(role_key, "")).lower())
        if role is None:
            raise ValueError(f"unknown role {t.get(role_key)!r}")
        turns.append((role, t[text_key]))
    return turns


def detect_format(obj: dict) -> str:
    """``flan``, ``alpaca``, ``sharegpt``, ``chat`` or ``text`` for one object (ValueError if none)."""
    if "inputs" in obj and "targets" in obj:
        return "flan"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "conversations" in obj:
        return "sharegpt"
    if "messages" in obj:
        return "chat"
    if "text" in obj:
        return "text"
    raise ValueError(f"unrecognised record with keys {sorted(obj)[:6]}")


def normalize_instruction(obj: dict, default_task: str = "local") -> list[dict]:
    """Records ``{"inputs","targets","task_name","template_type"}`` from one object of any
    instruction format. Raises ValueError with the reason if it is malformed."""
    fmt = detect_format(obj)
    if fmt == "flan":
        if not isinstance(obj["inputs"], str) or not isinstance(obj["targets"], str):
            raise ValueError("inputs and targets must be strings")
        recs = [
            {
                "inputs": obj["inputs"],
                "targets": obj["targets"],
                "template_type": obj.get("template_type") or fmt,
            }
        ]
    elif fmt == "alpaca":
        inst, inp, out = obj["instruction"], obj.get("input") or "", obj["output"]
        if not all(isinstance(x, str) for x in (inst, inp, out)):
            raise ValueError("instruction, input and output must be strings")
        recs = [{"inputs": f"{inst}\n\n{inp}" if inp.strip() else inst, "targets": out, "template_type": fmt}]
    elif fmt == "sharegpt":
        recs = _dialogue_records(_turns(obj["conversations"], "from", "value"), fmt)
    elif fmt == "chat":
        recs = _dialogue_records(_turns(obj["messages"], "role", "content"), fmt)
    else:
        raise ValueError("a pretraining {'text'} record, not an instruction record")
    task = obj.get("task_name") or default_task
    for r in recs:
        if not r["targets"].strip():
            raise ValueError("empty target")
        r["task_name"] = task
    return recs


def _iter_objects(path: Path, on_error: str, report: LoadReport | None) -> Iterator[tuple[str, dict]]:
    if path.suffix == ".parquet":
        for n, row in iter_parquet_rows(path):
            yield f"{path}:row {n}", row
    else:
        for n, obj in iter_jsonl(path, on_error, report):
            yield f"{path}:{n}", obj


def iter_instruction_file(
    path: str | os.PathLike, on_error: str = "skip", report: LoadReport | None = None
) -> Iterator[dict]:
    """Normalised instruction records of one ``.jsonl``/``.parquet`` file (streamed)."""
    path = Path(path)
    for where, obj in _iter_objects(path, on_error, report):
        try:
            recs = normalize_instruction(obj, default_task=path.stem)
        except (ValueError, TypeError, AttributeError) as e:
            _problem(f"{where}: {e}", on_error, report)
            continue
        for r in recs:
            if report is not None:
                report.records += 1
            yield r


def iter_text_documents(path: str | os.PathLike) -> Iterator[str]:
    """Documents of a ``.txt`` file: paragraphs separated by blank lines (streamed)."""
    lines: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                lines.append(line.strip())
            elif lines:
                yield " ".join(lines)
                lines = []
    if lines:
        yield " ".join(lines)


def iter_corpus_file(
    path: str | os.PathLike, on_error: str = "skip", report: LoadReport | None = None, text_key: str = "text"
) -> Iterator[str]:
    """Documents of one ``.txt``/``.jsonl``/``.parquet`` pretraining file (streamed)."""
    path = Path(path)
    if path.suffix == ".txt":
        it = ((None, d) for d in iter_text_documents(path))
    elif path.suffix == ".parquet":
        it = ((f"{path}:row {n}", row.get(text_key)) for n, row in iter_parquet_rows(path, [text_key]))
    elif path.suffix == ".jsonl":
        it = ((f"{path}:{n}", obj.get(text_key)) for n, obj in iter_jsonl(path, on_error, report))
    else:
        raise DataError(f"{path}: unsupported corpus file type (use {', '.join(CORPUS_SUFFIXES)})")
    for where, text in it:
        if not isinstance(text, str):
            _problem(f"{where}: missing or non-string {text_key!r}", on_error, report)
            continue
        if report is not None:
            report.records += 1
        yield text


def _first_object(path: Path) -> dict | None:
    """The first valid object of a JSONL/Parquet file (to tell corpus from instruction files)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.ParquetFile(str(path)).schema_arrow.names
        return {n: "" for n in names}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def _is_corpus_file(path: Path) -> bool:
    if path.suffix == ".txt":
        return True
    obj = _first_object(path)
    return (
        obj is not None
        and "text" in obj
        and not ({"inputs", "instruction", "conversations", "messages"} & set(obj))
    )


def data_files(data_dir: str | os.PathLike, kind: str) -> list[Path]:
    """Sorted files under ``data_dir`` of ``kind`` ``"corpus"`` or ``"instructions"``."""
    root = Path(data_dir)
    suffixes = CORPUS_SUFFIXES if kind == "corpus" else INSTRUCTION_SUFFIXES
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes and not p.name.startswith(".")
    )
    if kind == "corpus":
        return [p for p in files if _is_corpus_file(p)]
    return [p for p in files if not _is_corpus_file(p)]


# --------------------------------------------------------------------------------- shards


@dataclass
class Shard:
    """A resolved shard: iterate it for records (``kind="instructions"``: dicts) or documents
    (``kind="corpus"``: strings). Iterating again starts over; ``report`` covers the last pass."""

    spec: str
    kind: str
    description: str
    factory: Callable[[LoadReport], Iterator] = field(repr=False)
    report: LoadReport = field(default_factory=LoadReport)
    #: records a seeded pass shuffles at once: a window for files streamed from disk (memory stays
    #: bounded), the whole shard for the embedded tasks (already in memory), so that a round seeded
    #: anew draws its steps from anywhere in the shard, not again from its first records
    shuffle_buffer: int = 10000

    def __iter__(self):
        self.report = LoadReport()
        return self.factory(self.report)


_SLICE = re.compile(r"^(\d+)-of-(\d+)$")


def parse_slice(text: str) -> tuple[int, int]:
    """``"i-of-n"`` -> ``(i, n)`` with 0 <= i < n."""
    m = _SLICE.match(text)
    if not m:
        raise ValueError(f"bad slice {text!r}: expected '<i>-of-<n>'")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"bad slice {text!r}: need 0 <= i < n")
    return i, n


LOCAL_SPLITS = ("train", "validation", "test")


def local_split(record: dict) -> str:
    """The split of a record of the user's own instruction data, by a hash of its text (as the default tasks
    are split: 80% train, 10% validation, 10% test): stable across machines, file order and growth."""
    from .tasks import hash_split

    return hash_split(["local", record["inputs"], record["targets"]])


def _every_nth(items: Iterable, i: int, n: int) -> Iterator:
    for k, x in enumerate(items):
        if k % n == i:
            yield x


def _interleave(iterables: list[Iterable]) -> Iterator:
    """Round-robin over several iterables (so a task group's records are mixed, not in blocks)."""
    its = [iter(x) for x in iterables]
    while its:
        alive = []
        for it in its:
            x = next(it, _END)
            if x is not _END:
                alive.append(it)
                yield x
        its = alive


_END = object()


def default_task_groups(n: int) -> list[list[tuple[str, int, int]]]:
    """The seen tasks split into ``n`` deterministic groups of ``(task, k, m)``: the group holds
    examples ``j`` of ``task`` with ``j % m == k``. With ``n <= tasks`` groups are
    round-robin over the sorted task names (whole tasks); with more groups than tasks, task
    ``t`` goes to groups ``t, t + T, ...`` and its examples are split among them."""
    from .tasks import SEEN_TASKS

    tasks = list(SEEN_TASKS)
    groups: list[list[tuple[str, int, int]]] = [[] for _ in range(n)]
    if n <= len(tasks):
        for t, name in enumerate(tasks):
            groups[t % n].append((name, 0, 1))
    else:
        for g in range(n):
            t = g % len(tasks)
            sharing = [h for h in range(n) if h % len(tasks) == t]
            groups[g].append((tasks[t], sharing.index(g), len(sharing)))
    return groups


#: The shard heads that split the embedded seen tasks among ``n`` workers (:func:`resolve_shard`): each
#: worker its own tasks, or each a slice of every task.
TASK_LAYOUTS: tuple[str, ...] = ("default", "default-mixed")


def resolve_shard(
    spec: str,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    on_error: str = "skip",
    cache_dir=None,
    allow_heldout: bool = False,
) -> Shard:
    """Resolve a shard spec (docs/INTERFACES.md) against this machine's data.

    * ``default:<i>-of-<n>``: the seen default tasks in group ``i`` of ``n`` (:func:`default_task_groups`):
      each worker its own tasks, ColD Fusion's setting of contributors with different datasets;
    * ``default-mixed:<i>-of-<n>``: every seen default task, examples ``j`` with ``j % n == i`` of each: each
      worker a slice of every task, so that an average of the workers does not halve each task's progress;
    * ``default:task=<name>[,<name>...]``: named default tasks (held-out ones only with
      ``allow_heldout=True``: they must never be in a training shard);
    * ``local`` / ``local:<i>-of-<n>``: the instruction files under ``data_dir``, all or every
      n-th record starting at i (records counted over the sorted files) of the split: a record's
      split follows from a hash of its text (:func:`local_split`), so it is the same on every machine
      and never moves when files grow;
    * ``corpus:<i>-of-<n>``: every n-th document of the pretraining corpus: the files under
      ``data_dir`` if it holds any, else the default corpus.

    ``split`` picks the split (train/validation/test). Records stream; nothing is read until the
    shard is iterated."""
    head, _, rest = spec.partition(":")
    if head == "default":
        return _default_shard(spec, rest, split, cache_dir, allow_heldout)
    if head == "default-mixed":
        from .tasks import SEEN_TASKS

        i, n = parse_slice(rest)
        return _task_shard(spec, [(t, i, n) for t in SEEN_TASKS], split, cache_dir, f", slice {i} of {n}")
    if head == "local":
        return _local_shard(spec, rest, data_dir, split, on_error)
    if head == "corpus":
        return _corpus_shard(spec, rest, data_dir, on_error)
    raise ValueError(
        f"unknown shard spec {spec!r}: expected default:, default-mixed:, local, local:, or corpus:"
    )


def _default_shard(spec: str, rest: str, split: str, cache_dir, allow_heldout: bool) -> Shard:
    """``default:<i>-of-<n>`` or ``default:task=<names>``: the embedded tasks (see :func:`resolve_shard`)."""
    from .tasks import HELDOUT_TASKS, TASKS

    if rest.startswith("task="):
        names = [x for x in rest[len("task=") :].split(",") if x]
        unknown = [x for x in names if x not in TASKS]
        if unknown or not names:
            raise ValueError(f"shard {spec!r}: unknown task(s) {unknown}; tasks: {sorted(TASKS)}")
        held = [x for x in names if x in HELDOUT_TASKS]
        if held and not allow_heldout:
            raise ValueError(f"shard {spec!r}: {held} are held out and never in a training shard")
        group = [(x, 0, 1) for x in names]
    else:
        i, n = parse_slice(rest)
        group = default_task_groups(n)[i]
    return _task_shard(spec, group, split, cache_dir)


def _task_shard(
    spec: str, group: list[tuple[str, int, int]], split: str, cache_dir, label: str = ""
) -> Shard:
    """The embedded tasks' examples ``j`` with ``j % m == k`` for each ``(task, k, m)`` of ``group``,
    interleaved; ``label`` is added to the description."""
    from .tasks import load_task_split

    def factory(report: LoadReport) -> Iterator:
        parts = [_every_nth(load_task_split(t, split, cache_dir=cache_dir), k, m) for t, k, m in group]
        for rec in _interleave(parts):
            report.records += 1
            yield rec

    desc = f"default tasks {[t for t, _, _ in group]}{label} ({split})"
    return Shard(spec, "instructions", desc, factory, shuffle_buffer=sys.maxsize)


def _local_shard(spec: str, rest: str, data_dir, split: str, on_error: str) -> Shard:
    """``local`` or ``local:<i>-of-<n>``: the instruction files under ``data_dir``."""
    if data_dir is None:
        raise ValueError(f"shard {spec!r} needs a data directory (--data DIR)")
    i, n = parse_slice(rest) if rest else (0, 1)
    files = data_files(data_dir, "instructions")
    if not files:
        raise ValueError(f"shard {spec!r}: no instruction files (.jsonl/.parquet) under {data_dir}")
    if split not in LOCAL_SPLITS:
        raise ValueError(f"shard {spec!r}: unknown split {split!r}; one of {list(LOCAL_SPLITS)}")

    def factory(report: LoadReport) -> Iterator:
        recs = (r for f in files for r in iter_instruction_file(f, on_error, report))
        yield from _every_nth((r for r in recs if local_split(r) == split), i, n)

    return Shard(
        spec, "instructions", f"{len(files)} local file(s) under {data_dir}, slice {i} of {n}", factory
    )


def _corpus_shard(spec: str, rest: str, data_dir, on_error: str) -> Shard:
    """``corpus:<i>-of-<n>``: the corpus files under ``data_dir`` if it holds any, else the default corpus."""
    i, n = parse_slice(rest)
    files = data_files(data_dir, "corpus") if data_dir is not None and Path(data_dir).is_dir() else []
    if files:

        def factory(report: LoadReport) -> Iterator:
            docs = (d for f in files for d in iter_corpus_file(f, on_error, report))
            yield from _every_nth(docs, i, n)

        return Shard(
            spec, "corpus", f"{len(files)} corpus file(s) under {data_dir}, slice {i} of {n}", factory
        )

    from .corpus import CorpusConfig, document

    cfg = CorpusConfig()

    def default_factory(report: LoadReport) -> Iterator:
        for k in range(i, cfg.num_docs, n):
            report.records += 1
            yield document(cfg.seed, k)

    return Shard(spec, "corpus", f"default corpus, slice {i} of {n}", default_factory)
