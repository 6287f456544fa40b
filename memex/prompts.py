"""Prompt sources. Every prompt gets a stable id so a sample's seed and row can be found again.

    file      .txt (one prompt per line), .csv (a header row), .jsonl or .parquet (field `prompts.column`),
              or a datasets save_to_disk folder (its Arrow files)
    captions  a training manifest (Parquet or a save_to_disk folder, caption column): captions ranked by how often the
              exact caption repeats, most duplicated first (the paper's prompt choice; near-
              duplicate image counts replace this once the membership index exists)
    none      unconditional models: one prompt with id "uncond" and empty text
    near_duplicates  (memex audit) training captions ranked by near-duplicate image counts from
              the membership index: `rank_by_near_duplicates`, called by the audit stage

Output: a pyarrow table (prompt_id, prompt) in generation order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import posixpath
import re
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memex.config import MemexError, PromptsConfig, PromptSource
from memex.layout import PROMPTS_SCHEMA
from memex.manifest import (
    ManifestError,
    arrow_schema,
    first_caption,
    hf_dataset_parts,
    no_lone_surrogates,
    open_arrow,
    parquet_parts,
    read_arrow,
    read_schemas,
    unified_schema,
)

UNCONDITIONAL_ID = "uncond"
# texts -> one key a text, equal where the model reads the same tokens (models.conditioning_keys)
Keys = Callable[[list[str]], list[Hashable]]
_CHUNK = 8192  # captions tokenized at a time (~0.4 s)
_BATCH = 1 << 16  # prompts=captions: caption rows read, stripped and counted at a time (~4 MB of text)
_FOLD = 1 << 18  # batches' distinct captions held before they are folded into the counts so far, at least (~16 MB)
# str.strip()'s whitespace exactly, for Arrow's utf8_trim: the 29 characters str.isspace() holds (\x1c-\x1f and
# \x85 among them, which Unicode does not call whitespace); utf8_trim_whitespace follows Arrow's own table.
# tests/test_caption_prompts_memory.py checks it against every code point and utf8_trim against str.strip
_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
               "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
log = logging.getLogger("memex.prompts")


class PromptError(MemexError, ValueError):
    """The prompt source is missing, unreadable or empty; the message names the file."""


def prompt_id(text: str) -> str:
    """Stable 16-hex id from the prompt text (same text, same id, on every machine)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _open_table(path: str, storage_options: dict[str, Any], columns: dict[str, str] | None = None,
                batches: bool = False) -> pa.Table | Iterator[pa.Array]:
    """The prompt file as a table; a Parquet file or folder is read with only `columns` (column -> the
    key that names it) (a training manifest with embedded images given as prompts.path: 5M rows x ~40 KB
    of images were read whole into the driver for one caption column). With `batches` (one column), a
    Parquet file or folder and a datasets folder give that column's arrays a record batch at a time, once
    the column is checked (prompts=captions over a whole training manifest); the text formats a table."""
    fs, p = fsspec.core.url_to_fs(path, **storage_options)
    if not fs.exists(p):
        raise PromptError(f"prompts.path={path} does not exist")
    ext = posixpath.splitext(p)[1].lower()
    try:
        is_dir = fs.isdir(p)
        parts = hf_dataset_parts(fs, p, path, "prompts.path") if is_dir else None
        if parts:  # datasets' save_to_disk folder: its Arrow files, only `columns` of them (as for Parquet)
            names = arrow_schema(fs, parts[0]).names if columns else None
            for c, key in (columns or {}).items():
                if c not in names:
                    raise PromptError(f"{path} has no column {c!r} (columns: {names}); set {key}=<column>")
            if batches:
                return _reading(path, _arrow_column(f"prompts.path={path}", fs, parts, *columns))
            return read_arrow(f"prompts.path={path}", fs, parts, list(columns) if columns else None)
        if ext == ".parquet" or is_dir:
            # a folder: its Parquet parts only, as the training set's reader takes them (images or
            # img2dataset's _stats.json beside them were read as Parquet and failed)
            parts = parquet_parts(p, fs.find(p)) if is_dir else p
            if is_dir and not parts:
                raise PromptError(f"prompts.path={path} is a folder without a .parquet file: give a prompt file "
                                  "(.txt, .jsonl, .csv, .parquet) or a folder of Parquet parts")
            # one schema for all the parts: read with the first one's, a caption column pandas wrote all-None
            # there (type null) refused the later parts' captions ("Unsupported cast from string to null")
            schemas = read_schemas(f"prompts.path={path}", fs, parts) if is_dir and len(parts) > 1 else None
            schema = unified_schema(f"prompts.path={path}", parts, schemas) if schemas else None
            names = (schema or pq.ParquetDataset(parts, filesystem=fs).schema).names if columns else None
            for c, key in (columns or {}).items():
                if c not in names:
                    raise PromptError(f"{path} has no column {c!r} (columns: {names}); set {key}=<column>")
            if batches:
                (c,) = columns
                # a part without the column: nulls, as pq.read_table gives it under the unified schema
                return _reading(path, _parquet_column(fs, [pt for n, pt in enumerate(parts if is_dir else [p])
                                                          if schemas is None or c in schemas[n].names],
                                                      c, schema.field(c).type if schema else None))
            return pq.read_table(parts, filesystem=fs, columns=list(columns) if columns else None, schema=schema)
        with fs.open(p, "rb") as f:
            # utf-8-sig: a file saved with a byte-order mark (Windows editors) loses it; as "utf-8" the
            # mark stayed in the first prompt (3 extra CLIP tokens) and failed a .jsonl's first line
            raw = f.read().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptError(f"prompts.path={path} is not UTF-8 text: {e}") from e
    except ManifestError as e:  # a datasets folder's own message names the key and the fix
        raise PromptError(str(e)) from e
    except PromptError:  # a missing column, named above
        raise
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise PromptError(f"cannot read prompts.path={path}: {type(e).__name__}: {e}") from e
    # lines end at \n, \r\n or \r only: str.splitlines also breaks at U+0085 (NEL, common in caption
    # mojibake), U+2028/9 and \x0c-\x1e, which split one prompt in two and broke JSON text holding them
    lines = re.split(r"\r\n|\r|\n", raw)
    if ext == ".jsonl":
        rows = []
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise PromptError(f"{path} line {n} is not valid JSON: {e}") from e
                if not isinstance(rows[-1], dict):
                    raise PromptError(f"{path} line {n} is not a JSON object ({{\"prompt\": ...}} a line)")
        # the wanted keys found on any line (from_pylist took the first line's: a key it lacked was "no column";
        # the others are not read: a stray key of two types fails nothing), and text with a lone surrogate
        # escape ("\ud83d": an emoji cut in half, common in scraped captions) as U+FFFD
        present = dict.fromkeys(k for r in rows for k in r)
        for c, key in (columns or {}).items():  # as for Parquet and CSV: the file's keys, and the one to set
            if rows and c not in present:
                raise PromptError(f"{path} has no column {c!r} (columns: {list(present)}); set {key}=<column>")
        keys = [k for k in columns if k in present] if columns else list(present)
        out = {}
        for k in keys:
            try:
                out[k] = pa.array([no_lone_surrogates(r.get(k)) for r in rows])
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise PromptError(f"{path}: key {k!r} holds values of two types ({e}): give it one type on every "
                                  "line (an id a string everywhere, or a number everywhere)") from e
        return pa.table(out)
    if ext in (".txt", ""):
        lines = [ln.strip() for ln in lines]
        return pa.table({"prompt": [ln for ln in lines if ln]})
    if ext == ".csv":  # a header row names the columns (prompts.column, prompts.id_column)
        reader = csv.DictReader(io.StringIO(raw))
        rows = list(reader)
        for n, row in enumerate(rows, 2):
            if None in row:  # more fields than the header: DictReader files the rest under None, silently
                raise PromptError(f"{path} line {n} has more fields than its header {reader.fieldnames}: a prompt "
                                  "holding a comma was cut at it (or an id took part of it); quote such fields "
                                  '("a red car, parked at night")')
        return pa.Table.from_pylist(rows) if rows else pa.table({})
    raise PromptError(f"prompts.path={path}: unsupported extension {ext!r}; use .txt, .csv, .jsonl or .parquet")


def _reading(path: str, arrays: Iterator[pa.Array]) -> Iterator[pa.Array]:
    """`arrays`, its read errors named as _open_table names them."""
    try:
        yield from arrays
    except ManifestError as e:  # a datasets folder's own message names the part
        raise PromptError(str(e)) from e
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise PromptError(f"cannot read prompts.path={path}: {type(e).__name__}: {e}") from e


def _parquet_column(fs: fsspec.AbstractFileSystem, parts: list[str], column: str,
                    typ: pa.DataType | None) -> Iterator[pa.Array]:
    """A column of Parquet `parts`, a batch at a time, cast to `typ` (the parts' unified type) where given.
    pre_buffer=False: one row group's column chunk held at a time (manifest._parquet_batches)."""
    for part in parts:
        with pq.ParquetFile(part, filesystem=fs, pre_buffer=False) as f:
            for batch in f.iter_batches(batch_size=_BATCH, columns=[column]):
                arr = batch.column(0)
                yield arr if typ is None or arr.type == typ else arr.cast(typ)


def _arrow_column(path: str, fs: fsspec.AbstractFileSystem, parts: list[str], column: str) -> Iterator[pa.Array]:
    """A column of a datasets folder's Arrow `parts`, a record batch at a time (read_arrow's, which held
    the whole column); a part whose column has another type is refused as read_arrow refuses it."""
    typ = None
    for part in parts:
        try:
            with fs.open(part, "rb") as f:
                schema, batches = open_arrow(f)
                field = schema.field(column)
                typ = field.type if typ is None else typ
                if field.type != typ:
                    raise ManifestError(f"{path}: its Arrow files have different columns ({column!r} is {typ} in "
                                        f"{posixpath.basename(parts[0])}, {field.type} in "
                                        f"{posixpath.basename(part)})")
                for b in batches:
                    yield b.column(column)
        except ManifestError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised naming the file
            raise ManifestError(f"{path}: {posixpath.basename(part)} is not readable Arrow: "
                                f"{type(e).__name__}: {e}") from e


def _has_column(table: pa.Table, name: str, path: str, key: str) -> None:
    """A missing column refused naming the table's columns and the key to set."""
    if name not in table.column_names:
        raise PromptError(f"{path} has no column {name!r} (columns: {table.column_names}); set {key}=<column>")


def _column(table: pa.Table, name: str, path: str, key: str) -> list[str | None]:
    """The column's cells as text: a string; a list of strings (several captions an image,
    COCO-style) gives its first, where str() made "['a', 'b']" a prompt; a number its digits."""
    _has_column(table, name, path, key)
    out: list[str | None] = []
    for v in table.column(name).to_pylist():
        v = first_caption(v)
        if isinstance(v, (dict, bytes)):
            raise PromptError(f"{path}: column {name!r} holds {table.schema.field(name).type}, not text; set "
                              f"{key}=<a text column>")
        out.append(None if v is None else str(v))
    return out


def _ids(table: pa.Table, name: str, path: str, texts: list[str]) -> list[str]:
    """prompts.id_column as text ids, checked: a null id became "None" (every later null-id prompt was
    then dropped as a repeat), a float column's 3 became "3.0", and a second text under one id was
    dropped without a word."""
    out, seen = [], {}
    as_text = _column(table, name, path, "prompts.id_column")  # lists and bytes refused there
    for n, (v, i, t) in enumerate(zip(table.column(name).to_pylist(), as_text, texts)):
        if not t:  # a row without text is dropped below (a spreadsheet's blank trailing rows): its id is not asked
            out.append(i or "")
            continue
        # a blank CSV cell is "" (DictReader), not None: it was the id "" of a sample id "/0"
        if i is None or not i.strip() or (isinstance(v, float) and v != v):
            raise PromptError(f"{path}: row {n} has no id in prompts.id_column={name!r}; give every prompt an id, "
                              "or drop prompts.id_column (ids are then hashes of the texts)")
        if isinstance(v, float) and v.is_integer():  # an integer column read as float (NaN elsewhere in it)
            i = str(int(v))
        if t and seen.setdefault(i, t) != t:
            raise PromptError(f"{path}: id {i!r} (prompts.id_column={name!r}) names two prompts, {seen[i]!r} and "
                              f"{t!r}; ids must be unique per text")
        out.append(i)
    return out


class _Distinct:
    """Prompts in order, each text once and, where `same` is given, each conditioning once: the first kept.
    A repeat's budget would go to a prompt already sampled (with other noises, so no error shows it)."""

    def __init__(self, same: Keys | None, by_text: bool = True):
        self.same, self.rows, self.merged, self.by_text = same, [], [], by_text
        self._seen: set[str] = set()  # texts (ids, by_text=False) taken or dropped
        self._keys: dict[Hashable, str] = {}  # conditioning -> the text that holds it (with `same`)

    def add(self, texts: Iterable[str], ids: Iterable[str] | None = None) -> None:
        texts = list(texts)
        # by_text=False: each id once, as memex read prompts before 2026-12-07 (one text under two ids twice),
        # which a run folder started then resumes with (generate.started_unmerged)
        new = [(i, t) for i, t in zip(ids if ids is not None else [None] * len(texts), texts)
               if t and (k := t if self.by_text or i is None else i) not in self._seen and not self._seen.add(k)]
        for (i, t), k in zip(new, self.same([t for _, t in new]) if self.same and new else [None] * len(new)):
            if k is not None and k in self._keys:
                self.merged.append((t, self._keys[k]))
                continue
            if k is not None:
                self._keys[k] = t
            self.rows.append((i if i is not None else prompt_id(t), t))

    def log_merged(self) -> None:
        if self.merged:
            shown = "; ".join(f"{a!r} as {b!r}" for a, b in self.merged[:3])
            log.info("%d prompts are read by the model's tokenizer as the same tokens as an earlier prompt (case, "
                     "spacing, or text past its token limit), and are sampled once, as that prompt: %s%s",
                     len(self.merged), shown, "; ..." if len(self.merged) > 3 else "")


def rank_captions(captions: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Distinct captions with their exact-duplicate counts, most duplicated first (ties: by text)."""
    counts = pa.table({"caption": captions}).group_by("caption").aggregate([("caption", "count")])
    counts = counts.filter(pc.invert(pc.is_null(counts["caption"])))
    return counts.sort_by([("caption_count", "descending"), ("caption", "ascending")])


def _stripped(arr: pa.Array, path: str, column: str) -> pa.Array:
    """A batch of the caption column as stripped text (large_string: no 2 GB offset limit once counted),
    as _column and str.strip() make it: text in Arrow; other types (a list of captions, numbers) a batch of
    Python values at a time, through _column."""
    typ = arr.type.value_type if pa.types.is_dictionary(arr.type) else arr.type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ):
        return pc.utf8_trim(arr.cast(pa.large_string()), characters=_WHITESPACE)
    texts = _column(pa.table({column: arr}), column, path, "prompts.caption_column")
    return pa.array([t.strip() if t is not None else None for t in texts], pa.large_string())


def _caption_counts(arrays: Iterable[pa.Array], path: str, column: str) -> tuple[pa.Array, np.ndarray]:
    """The stripped captions of `arrays`, each once, in ascending order (Arrow's, as rank_captions' ties), and
    their exact-duplicate counts; empty and null ones left out. Counted a batch at a time and the partial counts
    folded together: what is held follows the distinct captions, not the rows (a Python str a row over the whole
    column peaked at ~330 bytes a row: a 3M-row manifest +948 MiB, whatever prompts.limit)."""
    captions, counts = pa.array([], pa.large_string()), np.zeros(0, np.int64)  # folded so far
    partial: list[tuple[pa.Array, np.ndarray]] = []  # batches' (distinct captions, counts), not yet folded
    rows = 0

    def fold() -> None:
        # sorted, a caption's partial counts lie side by side and are summed: the captions held about twice at the
        # peak (2.7M distinct, 177 MB: Arrow's pool +230 MB; dictionary_encode + bincount +600 MB, its hash table
        # and memo growing by doubling; Acero's group_by(...).sum more)
        nonlocal captions, counts, rows
        # one array: a chunked array's take concatenates its chunks first (a third copy)
        values = pa.concat_arrays([captions, *(v for v, _ in partial)])
        weights = np.concatenate([counts, *(c for _, c in partial)])
        partial.clear()
        captions = None
        order = pc.sort_indices(values)
        values, weights = values.take(order), weights[order.to_numpy()]
        del order
        first = np.ones(len(values), bool)
        if len(values) > 1:
            first[1:] = pc.not_equal(values.slice(1), values.slice(0, len(values) - 1)).to_numpy(zero_copy_only=False)
        if first.all():
            captions, counts = values, weights
        else:
            captions, counts = values.filter(first), np.add.reduceat(weights, np.flatnonzero(first))
        rows = 0

    for arr in arrays:
        if pa.types.is_null(arr.type) or len(arr) == arr.null_count:
            continue
        text = _stripped(arr, path, column)
        text = text.filter(pc.greater(pc.binary_length(text), 0))  # a null's length is null: dropped too
        if not len(text):
            continue
        vc = pc.value_counts(text)
        partial.append((vc.field("values"), vc.field("counts").to_numpy()))
        rows += len(vc)
        if rows >= max(_FOLD, len(captions)):  # each fold sorts the folded captions again: as often as they double
            fold()
    if partial:
        fold()
    return captions, counts


def rank_by_near_duplicates(dups: pa.Table | Any, limit: int | None, same: Keys | None = None) -> pa.Table:
    """Captions of the most near-duplicated training images first (the paper's prompt choice).

    `dups` has one row per training image with `caption` and `near_duplicates` (memex/stages/
    index.py), or is a memex.membership.NearDuplicates, read a page at a time until `limit` prompts
    are found (the audit's: the whole table held every training row in the driver, ~300 bytes each);
    a caption shared by several images keeps its best rank. Ties: by caption text.
    `same` (models.conditioning_keys): a caption the model reads as an earlier one's tokens is that
    prompt, and does not take a place of the `limit`.
    """
    # a first page of twice the limit (a chunk at least): a caption of several top images, or one `same` merges,
    # takes no place of the limit
    pages = [dups] if isinstance(dups, pa.Table) else dups.pages(None if limit is None else max(2 * limit, _CHUNK))
    picked = _Distinct(same)
    for page in pages:
        t = page.filter(pc.invert(pc.is_null(page["caption"])))
        # ties by the caption as stored, leading spaces included (" zebra" before "apple"): by the stripped text
        # would read better, but it would change the prompts, and so the names, of existing runs whose captions
        # tie at prompts.limit (a nightly's run folders are then refused every night)
        t = t.sort_by([("near_duplicates", "descending"), ("caption", "ascending")])
        captions = t["caption"]
        for start in range(0, len(captions), _CHUNK):  # tokenized a chunk at a time: the top 24 of 5M read ~8,192
            picked.add(c.strip() for c in captions.slice(start, _CHUNK).to_pylist())
            if limit is not None and len(picked.rows) >= limit:
                break
        if limit is not None and len(picked.rows) >= limit:
            break
    rows = picked.rows[:limit] if limit is not None else picked.rows
    if not rows:
        raise PromptError("the training set has no captions to use as prompts (trainset.caption_column is empty "
                          "or null on every row, or an image folder has neither a metadata.jsonl with that column "
                          "nor a <stem>.txt beside its images): give prompts=file, or prompts=none for an "
                          "unconditional model")
    picked.log_merged()
    return pa.table({"prompt_id": [r[0] for r in rows], "prompt": [r[1] for r in rows]}, schema=PROMPTS_SCHEMA)


def _text_chunks(texts: pa.Array, order: pa.Array) -> Iterator[tuple[list[str], list[str]]]:
    """`texts` in `order` and their prompt ids, _CHUNK at a time (a sorted copy of all the texts is not made)."""
    for start in range(0, len(order), _CHUNK):
        chunk = texts.take(order.slice(start, _CHUNK)).to_pylist()
        yield chunk, [prompt_id(t) for t in chunk]


def load_prompts(cfg: PromptsConfig, storage_options: dict[str, Any] | None = None, same: Keys | None = None,
                 by_text: bool = True) -> pa.Table:
    """The prompts of cfg, in order, each text once; `same` (models.conditioning_keys): each conditioning once.
    With prompts.id_column, a text under a second id is sampled once, under its first id (by_text=False: each
    id once, as before 2026-12-07)."""
    opts = storage_options or {}
    if cfg.source == PromptSource.near_duplicates:
        raise PromptError("prompts.source=near_duplicates is resolved by `memex audit` from its index")
    if cfg.source == PromptSource.none:
        return pa.table({"prompt_id": [UNCONDITIONAL_ID], "prompt": [""]}, schema=PROMPTS_SCHEMA)

    if cfg.source == PromptSource.captions:
        key = "prompts.caption_column"
        source = _open_table(cfg.path, opts, {cfg.caption_column: key}, batches=True)
        if isinstance(source, pa.Table):  # a text file, read whole
            _has_column(source, cfg.caption_column, cfg.path, key)
            source = iter(source.column(cfg.caption_column).chunks)
        captions, counts = _caption_counts(source, cfg.path, cfg.caption_column)
        # ranked as rank_captions ranks (count descending, ties by caption: the captions' own order, kept by the
        # stable sort); Python strs a chunk at a time (the top 24 of 5M distinct captions: 8,192 made)
        chunks = _text_chunks(captions, pa.array(np.argsort(-counts, kind="stable")))
    else:
        wanted = {cfg.column: "prompts.column", **({cfg.id_column: "prompts.id_column"} if cfg.id_column else {})}
        table = _open_table(cfg.path, opts, wanted)
        if table.num_rows == 0:
            raise PromptError(f"prompts.path={cfg.path} holds no prompts")
        texts = [t.strip() if t is not None else "" for t in _column(table, cfg.column, cfg.path, "prompts.column")]
        if cfg.id_column:
            ids = _ids(table, cfg.id_column, cfg.path, texts)
        else:
            ids = [prompt_id(t) for t in texts]
        keep = [i for i, t in enumerate(texts) if t]
        texts, ids = [texts[i] for i in keep], [ids[i] for i in keep]
        chunks = ((texts[start:start + _CHUNK], ids[start:start + _CHUNK]) for start in range(0, len(texts), _CHUNK))

    picked = _Distinct(same, by_text)
    for chunk, chunk_ids in chunks:  # not texts, ids: the file source's generator reads those
        picked.add(chunk, chunk_ids)
        if cfg.limit is not None and len(picked.rows) >= cfg.limit:
            break
    rows = picked.rows[: cfg.limit] if cfg.limit is not None else picked.rows
    if not rows:
        raise PromptError(f"prompts.path={cfg.path} holds no prompts (after dropping empty lines)")
    picked.log_merged()
    return pa.table({"prompt_id": [r[0] for r in rows], "prompt": [r[1] for r in rows]}, schema=PROMPTS_SCHEMA)


def read_run_prompts(layout) -> pa.Table:
    """A run folder's prompts.parquet (written by generate.prepare): every stage's prompt list."""
    return layout.store.read_table(layout.prompts_path, schema=PROMPTS_SCHEMA)
