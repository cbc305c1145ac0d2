"""Rows from whatever ``datasets.load_dataset`` reads: a local jsonl/json/parquet/csv file or folder of them,
a ``save_to_disk`` folder, or a hub dataset (``hf:ORG/NAME[:SUBSET][@SPLIT]``).

Two ways to read them:

- **Table** (default): the rows live in an Arrow file on disk that is memory-mapped, never held in
  memory; every row is checked before any compute (the dataset, the row and the column at fault), and
  row ``i`` is the same prompt as line ``i + 1`` of the same data in JSONL, so the order of training
  is the same.
- **Stream** (``streaming=true``): rows are read as training needs them, through a shuffle buffer of
  ``SHUFFLE_BUFFER`` rows reshuffled every epoch (``IterableDataset.shuffle`` / ``set_epoch``); nothing
  is downloaded or converted first, and a row is checked when it is read. A step's prompts stay a pure
  function of (seed, step): a resumed run skips to its step.

``datasets`` is an optional dependency (``pip install 'opd[datasets]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from opd.errors import OpdError

SUFFIX_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes
SHUFFLE_BUFFER = 10_000
HUB_PREFIX = "hf:"


@dataclass(frozen=True)
class DataOptions:
    """How rows are found and read: the column names (``*_field``), the split and subset of a hub
    dataset or folder, and streaming."""

    prompt_field: str = "prompt"
    answer_field: str = "answer"
    messages_field: str = "messages"  # OpenAI messages; ShareGPT ``conversations`` is found by itself
    completion_field: str = "completion"
    text_field: str = "text"
    split: str = "train"
    eval_split: str = "test"  # eval_file's split, when it names a hub dataset or a folder of splits
    subset: str = ""
    streaming: bool = False

    @property
    def prompt_columns(self) -> str:
        """The columns a prompt may come from, one of which a table must have."""
        return f"{self.prompt_field}|{self.messages_field}|conversations"

    @classmethod
    def of(cls, config) -> DataOptions:
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


def is_dataset_spec(spec: str) -> bool:
    """A hub dataset, a folder, or a data file of a format ``load_dataset`` reads."""
    if spec.startswith(HUB_PREFIX):
        return True
    path = Path(spec)
    return path.is_dir() or path.suffix.lower() in SUFFIX_BUILDERS


def parse_hub_spec(spec: str, options: DataOptions) -> tuple[str, str | None, str]:
    """``hf:ORG/NAME[:SUBSET][@SPLIT]`` -> (name, subset, split); the options give what the spec omits."""
    rest, _, split = spec[len(HUB_PREFIX):].partition("@")
    name, _, subset = rest.partition(":")
    if not name:
        raise OpdError(f"{spec}: name a dataset, as hf:ORG/NAME[:SUBSET][@SPLIT]")
    return name, subset or options.subset or None, split or options.split


def datasets_module():
    try:
        import datasets
    except ImportError:
        raise OpdError("reading a dataset other than JSONL needs the datasets package: "
                       "pip install 'opd[datasets]'") from None
    return datasets


def open_dataset(spec: str, options: DataOptions, what: str, split: str | None = None):
    """The ``datasets`` object ``spec`` names: a ``Dataset`` (memory-mapped) or, streaming, an
    ``IterableDataset``. ``what`` names the setting in errors; ``split`` overrides the options'."""
    ds_lib = datasets_module()
    streaming = options.streaming
    try:
        if spec.startswith(HUB_PREFIX):
            name, subset, chosen = parse_hub_spec(spec, options)
            return ds_lib.load_dataset(name, subset, split=split or chosen, streaming=streaming)
        path = Path(spec).expanduser()
        if not path.exists():
            raise OpdError(f"{what} {spec} does not exist")
        if path.is_dir() and any((path / marker).is_file() for marker in SAVED_MARKERS):
            loaded = ds_lib.load_from_disk(str(path))
            if isinstance(loaded, ds_lib.DatasetDict):
                chosen = split or options.split
                if chosen not in loaded:
                    raise OpdError(f"{what} {spec} has no split {chosen!r}; its splits: {', '.join(loaded)} "
                                   "(choose with split=)")
                loaded = loaded[chosen]
            return loaded.to_iterable_dataset() if streaming else loaded
        if path.is_dir():
            return ds_lib.load_dataset(str(path), split=split or options.split, streaming=streaming)
        builder = SUFFIX_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise OpdError(f"{what} {spec}: a file must be .jsonl, .json, .parquet or .csv (or give a folder, "
                           "a save_to_disk folder, or hf:ORG/NAME)")
        return ds_lib.load_dataset(builder, data_files={"train": str(path)}, split="train", streaming=streaming)
    except OpdError:
        raise
    except Exception as err:  # datasets' own errors: a missing hub dataset, a malformed file, a bad split
        raise OpdError(f"{what} {spec}: datasets could not read it ({type(err).__name__}: {err})") from err


def columns_of(dataset) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    return list(names) if names else None  # a stream of unknown features: None (rows are checked as read)


class TableRows:
    """Rows of a memory-mapped ``Dataset``, parsed on access: ``rows[i]`` is ``parse(row, where)``."""

    def __init__(self, dataset, name: str, parse: Callable[[dict, str], object]) -> None:
        self.dataset, self.name, self.parse = dataset, name, parse

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.parse(self.dataset[int(index)], f"{self.name} row {index}")

    def __iter__(self) -> Iterator:
        return (self[i] for i in range(len(self)))

    def check(self, progress: bool = True) -> None:
        """Every row parsed once (and thrown away): a bad row stops the run before any compute."""
        from opd.progress import progress as bar_over

        total = len(self.dataset)
        if not total:
            raise OpdError(f"{self.name} holds no rows")
        bar = bar_over(total=total, desc=f"checking {self.name}", unit="row", disable=not progress or total < 50_000)
        for start in range(0, total, 1000):
            batch = self.dataset[start : start + 1000]  # columnar: {column: [values]}
            for offset in range(len(next(iter(batch.values())))):
                self.parse({key: values[offset] for key, values in batch.items()}, f"{self.name} row {start + offset}")
            bar.update(min(1000, total - start))
        bar.close()


class StreamRows:
    """Rows of an ``IterableDataset`` in a seeded shuffle, reshuffled every epoch; ``take(start, count,
    seed)`` returns rows ``start .. start + count`` of that endless order, parsed. Reading is
    sequential: a request that does not continue the last one (a resume) starts over and skips."""

    def __init__(self, dataset, name: str, parse: Callable[[dict, str], object]) -> None:
        self.dataset, self.name, self.parse = dataset, name, parse
        self.position, self.seed, self.epoch, self.iterator = 0, None, 0, None

    def _restart(self, seed: int) -> None:
        self.seed, self.position, self.epoch = seed, 0, 0
        self.iterator = self._epoch_rows(0)

    def _epoch_rows(self, epoch: int) -> Iterator[dict]:
        shuffled = self.dataset.shuffle(seed=self.seed, buffer_size=SHUFFLE_BUFFER)
        shuffled.set_epoch(epoch)
        return iter(shuffled)

    def _next(self) -> dict:
        for _ in range(2):
            try:
                return next(self.iterator)
            except StopIteration:
                if self.position == 0:
                    break
                self.epoch += 1
                self.iterator = self._epoch_rows(self.epoch)
        raise OpdError(f"{self.name} holds no rows")

    def take(self, start: int, count: int, seed: int) -> list:
        if self.iterator is None or seed != self.seed or start < self.position:
            self._restart(seed)
        while self.position < start:
            self._next()
            self.position += 1
        out = []
        for _ in range(count):
            out.append(self.parse(self._next(), f"{self.name} row {self.position} of the stream (epoch "
                                                f"{self.epoch}, seed {seed})"))
            self.position += 1
        return out

    def first(self, count: int) -> list:
        """The first ``count`` rows in the dataset's own order (held-out prompts: always the same ones)."""
        return [self.parse(row, f"{self.name} row {i}") for i, row in enumerate(self.dataset.take(count))]


def open_rows(spec: str, options: DataOptions, what: str, parse: Callable[[dict, str], object],
              required: tuple[str, ...] = (), split: str | None = None, progress: bool = True):
    """``TableRows`` (checked) or, streaming, ``StreamRows`` over the dataset ``spec`` names. ``required``:
    groups of column names (``"prompt|messages|conversations"``), one of each must be a column."""
    dataset = open_dataset(spec, options, what, split)
    name = f"{what} {spec}"
    columns = columns_of(dataset)
    if columns is not None:
        for group in required:
            if not any(col in columns for col in group.split("|")):
                wanted = " or ".join(repr(col) for col in group.split("|"))
                raise OpdError(f"{name} has no column {wanted}; its columns: {', '.join(columns)} (map yours with "
                               "prompt_field=, messages_field=, answer_field=, completion_field=, text_field=)")
    if options.streaming:
        return StreamRows(dataset, name, parse)
    rows = TableRows(dataset, name, parse)
    rows.check(progress)
    return rows
