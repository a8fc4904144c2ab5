"""Image inputs of index_corpus, read without Ray: the units of work a source splits into, the
image layout of Parquet inputs (bytes, Hugging Face's struct, or paths), WebDataset tars streamed
member by member (as img2dataset writes them), and the row counts a unit's metadata gives.

The job (pipelines/index_corpus.py) builds its Ray Data reads from these."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from align.config import IndexCorpusConfig
from align.data.contracts import SOURCE_METADATA, ContractError
from align.data.images import IMAGE_EXTENSIONS
from align.data.tars import TarTimeout, TarUnreadable, read_members
from align.errors import InputNotFound
from align.storage import io


def plan_units(ic: IndexCorpusConfig, source: str) -> list[list[str]]:
    """Split the input into units: lists of files, in a stable order."""
    if io.is_file(source):
        files, per_unit = [source], 1
    elif ic.input_format == "parquet":
        files, per_unit = io.list_files(source, ".parquet"), ic.files_per_unit
    elif ic.input_format == "webdataset":
        files, per_unit = io.list_files(source, ".tar"), ic.files_per_unit
    else:
        files = [f for f in io.list_files(source) if f.lower().endswith(IMAGE_EXTENSIONS)]
        per_unit = ic.images_per_unit
    if not files:
        raise InputNotFound(f"no {ic.input_format} input files under {source}")
    return [files[i : i + per_unit] for i in range(0, len(files), per_unit)]


def parquet_image_layout(ic: IndexCorpusConfig, files: list[str]) -> str:
    """How the Parquet inputs hold their images, checked on every file's schema before work:
    "bytes" (a binary column), "struct" (Hugging Face's {bytes, path} struct: its bytes are read)
    or "path" (a string column of paths).

    Raises:
        ContractError: naming the file, the column and its type, when a file lacks the column or
            holds it as another type.
    """
    column = ic.image_column or ic.path_column
    wanted = "image bytes" if ic.image_column else "image paths"
    layouts = set()
    for f in files:
        schema = io.parquet_schema(f)
        names = schema.names
        for needed in (ic.id_column, column):
            if needed not in names:
                raise ContractError(
                    f"{f} has no column {needed!r} (index_corpus.id_column / image_column / "
                    f"path_column); it has {names}"
                )
        kind = schema.field(column).type
        if ic.image_column and (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            layouts.add("bytes")
        elif (
            ic.image_column
            and pa.types.is_struct(kind)
            and kind.get_field_index("bytes") >= 0
            and pa.types.is_binary(kind.field("bytes").type)
        ):
            layouts.add("struct")
        elif not ic.image_column and (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            layouts.add("path")
        else:
            raise ContractError(
                f"{f}: column {column!r} holds {kind}, not {wanted} (binary, or a struct with a "
                f"binary 'bytes' field as Hugging Face writes it; paths are strings)"
            )
    if len(layouts) > 1:
        raise ContractError(f"the Parquet inputs mix image layouts {sorted(layouts)}: use one")
    return layouts.pop()


IMG2DATASET_STATUS = ("status", "error_message")


def source_columns(files: list[str]) -> list[str]:
    """The columns beyond id and image that every Parquet file of a unit has and index_corpus
    carries: SOURCE_METADATA (caption, url, sha256), and img2dataset's status and error_message
    (its parquet output lists failed downloads as rows without an image)."""
    common = None
    for f in files:
        names = set(io.parquet_schema(f).names)
        common = names if common is None else common & names
    columns = [c for c in SOURCE_METADATA if c in common]
    if all(c in common for c in IMG2DATASET_STATUS):
        columns += IMG2DATASET_STATUS
    return columns


def struct_bytes(table: pa.Table, column: str) -> pa.Table:
    """Hugging Face's image struct {bytes, path} -> its bytes, in place of the struct."""
    index = table.schema.get_field_index(column)
    return table.set_column(index, column, pc.struct_field(table[column], "bytes"))


TAR_BATCH = 256  # samples per block a tar reader emits: memory is this many images, not a tar
# The read error of an input row img2dataset listed but could not download or resize.
NOT_DOWNLOADED = "not downloaded by img2dataset"
_SAMPLE_COLUMNS = ("image_id", "image", "read_error", *SOURCE_METADATA)


def _sidecar_metadata(name: str, data: bytes, sample: dict) -> None:
    """img2dataset's `{key}.txt` (the caption) and `{key}.json` (url, caption, sha256, ...)."""
    if name.endswith(".txt"):
        sample["caption"] = data.decode("utf-8", "replace")
        return
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # metadata is a bonus: an unreadable sidecar costs it, not the image
    if isinstance(meta, dict):
        for column in SOURCE_METADATA:
            value = meta.get(column)
            if isinstance(value, str) and sample.get(column) is None:
                sample[column] = value


TAR_TIMEOUT_S = IndexCorpusConfig.model_fields["tar_timeout_s"].default
# Members whose bytes a tar's reader sends back: the images and img2dataset's sidecars.
_READ_EXTENSIONS = (*IMAGE_EXTENSIONS, ".txt", ".json")


def _new_sample(key: str) -> dict:
    return dict.fromkeys(_SAMPLE_COLUMNS) | {"image_id": key, "read_error": ""}


def _unread_row(path: str, read_error: str) -> dict:
    return dict.fromkeys(_SAMPLE_COLUMNS) | {"image_id": f"{path}#unread", "read_error": read_error}


def tar_samples(path: str, max_member_bytes: int, tar_timeout_s: float = TAR_TIMEOUT_S):
    """Stream a WebDataset tar (as img2dataset writes it, plain or compressed) member by member:
    yields one dict per sample key with the SCORED source columns (`image_id`, `image` bytes or
    None, `read_error` or "", and caption, url, sha256 from the `.txt`/`.json` sidecars). A
    member over `max_member_bytes` (a tar bomb), a sample with no image, a tar cut short and a
    tar not read within `tar_timeout_s` (align.data.tars: parsed in a child process) become errors;
    what was read before the cut is kept.

    Raises:
        align.data.tars.TarOpenError: the tar could not be opened.
    """
    current: dict = {}  # samples of the current key: img2dataset writes a key's members together

    def flush():
        for sample in current.values():
            if sample["image"] is None and not sample["read_error"]:
                sample["read_error"] = "empty file (no image member)"
            yield sample
        current.clear()

    try:
        for member in read_members(path, _READ_EXTENSIONS, max_member_bytes, tar_timeout_s):
            key, _, ext = member.name.rpartition(".")
            if key not in current:
                yield from flush()
                current[key] = _new_sample(key)
            sample = current[key]
            image = f".{ext.lower()}" in IMAGE_EXTENSIONS
            if not image and ext.lower() not in ("txt", "json"):
                continue
            if member.size > max_member_bytes:
                if image:
                    sample["read_error"] = (
                        f"tar member {member.name} is {member.size} bytes, over "
                        f"index_corpus.max_member_bytes={max_member_bytes}"
                    )
            elif image:
                sample["image"] = member.data
            else:
                _sidecar_metadata(member.name, member.data, sample)
    except TarUnreadable as e:
        if e.member is not None:  # its sample is the last, or one of its own
            key = e.member.rpartition(".")[0]
            if key not in current:
                yield from flush()
                current[key] = _new_sample(key)
            current[key]["read_error"] = f"tar member {e.member} unreadable: {e.reason}"
        yield from flush()
        yield _unread_row(path, f"tar cut short or corrupt after the samples above: {e.reason}")
        return
    except TarTimeout:
        yield from flush()
        yield _unread_row(
            path,
            f"tar not read within index_corpus.tar_timeout_s={tar_timeout_s:g} s (its parse or "
            f"its read stalled; the reader was stopped): the samples above were read",
        )
        return
    yield from flush()


def _sidecar(path: str, suffix: str) -> str:
    """img2dataset's file beside a shard: 00012.tar -> 00012.parquet, 00012_stats.json."""
    return path[: -len(".tar")] + suffix if path.endswith(".tar") else path + suffix


def failed_downloads(path: str):
    """The rows img2dataset listed for a tar but never wrote into it, from the `{shard}.parquet`
    beside it (key, status, error_message, url, caption): a table in the tar reader's columns,
    each with a read error; None when there is no such sidecar."""
    sidecar = _sidecar(path, ".parquet")
    if not io.exists(sidecar):
        return None
    names = io.parquet_schema(sidecar).names
    if "key" not in names or "status" not in names:
        return None
    columns = [c for c in ("key", "status", "error_message", *SOURCE_METADATA) if c in names]
    table = io.read_parquet(sidecar, columns=columns)
    return not_downloaded_rows(
        table.rename_columns(["image_id" if c == "key" else c for c in columns]),
        keep_downloaded=False,
    )


def not_downloaded_rows(table: pa.Table, keep_downloaded: bool = True) -> pa.Table:
    """img2dataset's `status` / `error_message` columns -> `read_error` (NOT_DOWNLOADED and
    why, for each row that is not a success; "" otherwise), and the rows in the tar reader's
    columns. keep_downloaded=False keeps only the failed rows (a tar's sidecar)."""
    status = table["status"].cast(pa.string())
    failed = pc.fill_null(pc.not_equal(status, "success"), True)
    if not keep_downloaded:
        table, status, failed = table.filter(failed), status.filter(failed), failed.filter(failed)
    why = (
        pc.fill_null(table["error_message"].cast(pa.string()), "")
        if "error_message" in table.column_names
        else pa.array([""] * table.num_rows, pa.string())
    )
    message = pc.binary_join_element_wise(
        pa.scalar(f"{NOT_DOWNLOADED} ("),
        pc.fill_null(status, "no status"),
        pa.scalar("): "),
        why,
        "",
    )
    read_error = pc.if_else(failed, message, "")
    out = table.drop_columns([c for c in ("status", "error_message") if c in table.column_names])
    return out.append_column("read_error", read_error)


def stats_failed_downloads(files: list[str]) -> int:
    """Failed downloads of tars whose failures no sidecar parquet lists, from img2dataset's
    `{shard}_stats.json` (count - successes): counted in the manifest, there are no rows."""
    total = 0
    for path in files:
        stats = _sidecar(path, "_stats.json")
        if io.exists(_sidecar(path, ".parquet")) or not io.exists(stats):
            continue
        facts = io.read_json(stats)
        total += max(0, int(facts.get("count", 0)) - int(facts.get("successes", 0)))
    return total


def read_tars(batch: dict, max_member_bytes: int, tar_timeout_s: float = TAR_TIMEOUT_S):
    """map_batches generator: tar paths -> blocks of the tar reader's columns, then the rows
    img2dataset listed beside each tar but could not download (with their read error). Each
    tar is read within `tar_timeout_s` (index_corpus.tar_timeout_s; see tar_samples)."""
    rows: list[dict] = []
    for path in batch["path"]:
        for sample in tar_samples(str(path), max_member_bytes, tar_timeout_s):
            rows.append(sample)
            if len(rows) >= TAR_BATCH:
                yield _tar_block(rows)
                rows = []
        failed = failed_downloads(str(path))
        if failed is not None and failed.num_rows:
            yield _tar_block(failed.to_pylist())
    if rows:
        yield _tar_block(rows)


def _tar_block(rows: list[dict]) -> pa.Table:
    columns = {c: [r.get(c) for r in rows] for c in _SAMPLE_COLUMNS}
    columns["image"] = [data or b"" for data in columns["image"]]
    return pa.table(
        {c: pa.array(v, pa.binary() if c == "image" else pa.string()) for c, v in columns.items()}
    )


def count_input_rows(ic: IndexCorpusConfig, files: list[str]) -> int | None:
    """Rows in a unit, from metadata where the format has it (None: count what was read)."""
    if ic.input_format == "parquet":
        total = 0
        for f in files:
            fs, path = io.filesystem(f)
            with fs.open_input_file(path) as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
        return total
    if ic.input_format == "folder":
        return len(files)
    return None
