"""What ``ampo-cache import`` reads: files, dataset repository folders, and ``TEACHER=PATH`` pairs.

- A file (JSONL, CSV or Parquet) is read as it is.
- A folder is a dataset repository as the Hugging Face Hub holds one (what ``git clone`` or
  ``huggingface-cli download --repo-type dataset`` leaves on disk): Parquet shards named
  ``SPLIT-0000K-of-0000N.parquet`` (older ``datasets`` versions add ``-HASH`` before the suffix)
  in ``data/`` (the Hub's default subset) or in the folder itself; ``--subset NAME`` reads the
  folder ``NAME/`` instead (OpenR1-Math-220k's ``extended/``). Every shard of the split
  (``--split``, default ``train``) is read, in shard order, as one table; a single ``SPLIT.parquet``
  counts as a split of one shard. A shard missing from the numbering (``00001`` of ``00003``), two
  files for one shard, or shards that disagree on how many there are fail with one line.
- ``TEACHER=PATH`` (either of the above): every trace read from PATH is TEACHER's. Several such
  arguments import per-teacher subsets of one problem set together: they are checked together (one
  answer per problem across all of them) before anything is written, and joined on the problem
  through ``prompt_id`` (ampo_cache.ids), so the same problem is one prompt whatever file and
  spacing it came in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ampo_common.errors import InputError
from ampo_cache.layouts import ParsedTrace, WideLayout, _Layout, resolve_layout
from ampo_cache.readers import FORMATS, ShardedTable

DEFAULT_SPLIT = "train"
DEFAULT_SUBSET = "data"  # where the Hub keeps a dataset's default subset
SHARD_NAME = re.compile(r"^(?P<split>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})(?:-[0-9a-f]+)?\.parquet$")


def _subset_folder(root: Path, subset: str | None) -> Path:
    if subset is None:
        return root / DEFAULT_SUBSET if (root / DEFAULT_SUBSET).is_dir() else root
    folder = root / subset
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.parquet")))
        raise InputError(str(root), f"no subset folder {subset!r} "
                                    f"(folders with Parquet files: {', '.join(found) or 'none'})")
    return folder


def _table_name(root: Path, folder: Path, split: str) -> str:
    inner = folder.relative_to(root).as_posix()
    return f"{root.name}/{split}" if inner == "." else f"{root.name}/{inner}/{split}"


def dataset_shards(root: str | Path, split: str = DEFAULT_SPLIT, subset: str | None = None) -> ShardedTable:
    """The Parquet shards of ``split`` in a dataset repository folder, checked complete, in order."""
    root = Path(root)
    folder = _subset_folder(root, subset)
    shards = [(m, p) for p in sorted(folder.glob("*.parquet")) if (m := SHARD_NAME.match(p.name))]
    mine = [(m, p) for m, p in shards if m["split"] == split]
    name = _table_name(root, folder, split)
    if not mine:
        single = folder / f"{split}.parquet"
        if single.is_file():
            return ShardedTable(folder, (single,), name)
        singles = {p.stem for p in folder.glob("*.parquet") if not SHARD_NAME.match(p.name)}
        splits = sorted({m["split"] for m, _ in shards} | singles)
        raise InputError(str(folder), f"no Parquet shards of split {split!r} (expected {split}-00000-of-0000N.parquet; "
                                      f"splits found: {', '.join(splits) or 'none'}); choose one with --split")
    counts = sorted({int(m["count"]) for m, _ in mine})
    if len(counts) > 1:
        listed = " vs ".join(f"-of-{c:05d}" for c in counts)
        raise InputError(str(folder), f"the {split} shards disagree on how many there are ({listed})")
    count, by_index = counts[0], {}
    for m, path in mine:
        index = int(m["index"])
        if index in by_index:
            raise InputError(str(folder), f"two files for {split} shard {index:05d}: "
                                          f"{by_index[index].name}, {path.name}")
        if index >= count:
            raise InputError(str(path), f"shard number {index:05d} is beyond the {count:05d} its name announces")
        by_index[index] = path
    missing = [f"{split}-{i:05d}-of-{count:05d}.parquet" for i in range(count) if i not in by_index]
    if missing:
        raise InputError(str(folder), f"{len(missing)} of {count} {split} shard(s) missing: {', '.join(missing)}")
    return ShardedTable(folder, tuple(by_index[i] for i in range(count)), name)


def open_input(path: str | Path, split: str = DEFAULT_SPLIT, subset: str | None = None) -> Path | ShardedTable:
    """A file as it is; a folder as the shards of one split of the dataset it holds (a folder named
    like a file, ``x.jsonl/``, is a mistaken file name: reported as no such file)."""
    path = Path(path)
    return dataset_shards(path, split, subset) if path.is_dir() and path.suffix.lower() not in FORMATS else path


def split_teacher(spec: str) -> tuple[str | None, Path]:
    """``TEACHER=PATH`` -> (TEACHER, PATH); a plain path (even one holding '=') -> (None, path)."""
    if "=" not in spec or Path(spec).exists():
        return None, Path(spec)
    teacher, _, rest = spec.partition("=")
    if "/" in teacher or "\\" in teacher:
        return None, Path(spec)  # a path with '=' in a folder name, which does not exist: "no such file"
    if not teacher.strip() or not rest:
        raise InputError(spec, "expected TEACHER=PATH (a teacher name, '=', then a file or dataset folder)")
    return teacher.strip(), Path(rest)


@dataclass
class ImportSource:
    """One input of an import: where its rows are, how to read them, and whose traces they are."""

    data: Path | ShardedTable
    layout: _Layout
    teacher: str | None = None  # TEACHER=PATH: every trace of this input is this teacher's

    @property
    def name(self) -> str:
        return self.data.name

    def traces(self) -> Iterator[ParsedTrace]:
        for row in self.layout.traces(self.data):
            if self.teacher:
                row.teacher = self.teacher
            yield row

    def describe(self) -> str:
        return self.layout.describe()


def open_sources(specs: list[str], *, layout: str = "auto", split: str = DEFAULT_SPLIT, subset: str | None = None,
                 **columns) -> list[ImportSource]:
    """Each ``FILE``, ``FOLDER`` or ``TEACHER=...`` argument with its layout (``columns``: the
    column options of ``resolve_layout``; a ``TEACHER=`` replaces its ``teacher``)."""
    if not specs:
        raise InputError("import", "no file or dataset folder to import")
    sources = []
    for spec in specs:
        teacher, path = split_teacher(spec)
        data = open_input(path, split, subset)
        chosen = resolve_layout(data, layout, **{**columns, "teacher": teacher or columns.get("teacher")})
        if teacher and isinstance(chosen, WideLayout) and len(set(chosen.columns.values())) > 1:
            raise InputError(spec, f"{teacher}= makes every trace one teacher's, but the file is in the wide layout "
                                   f"with a column per teacher ({', '.join(chosen.columns)}); import it without "
                                   f"{teacher}=")
        sources.append(ImportSource(data, chosen, teacher))
    return sources
