"""Image inputs of index_corpus, read without Ray: the units of work a source splits into, the
image layout of Parquet inputs (bytes, Hugging Face's struct, or paths), WebDataset tars streamed
member by member (as img2dataset writes them), and the row counts a unit's metadata gives.

The job (pipelines/index_corpus.py) builds its Ray Data reads from these."""

from __future__ import annotations

import tarfile
import zlib

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from align import io
from align.config import IndexCorpusConfig
from align.contracts import ContractError
from align.errors import InputNotFound
from align.images import IMAGE_EXTENSIONS


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
        fs, path = io.filesystem(f)
        with fs.open_input_file(path) as fh:
            schema = pq.read_schema(fh)
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


def struct_bytes(table: pa.Table, column: str) -> pa.Table:
    """Hugging Face's image struct {bytes, path} -> its bytes, in place of the struct."""
    index = table.schema.get_field_index(column)
    return table.set_column(index, column, pc.struct_field(table[column], "bytes"))


TAR_BATCH = 256  # samples per block a tar reader emits: memory is this many images, not a tar


def tar_samples(path: str, max_member_bytes: int):
    """Stream a WebDataset tar (as img2dataset writes it, plain or compressed) member by member:
    yields (image_id, image bytes or None, error or ""), one per sample key. Captions and
    metadata are not read. A member over `max_member_bytes` (a tar bomb), a sample with no image
    and a tar cut short become errors; what was read before the cut is kept."""
    fs, inner = io.filesystem(path)
    current: dict = {}  # samples of the current key: img2dataset writes a key's members together

    def flush():
        for key, (data, error) in current.items():
            yield key, data, error or ("" if data is not None else "empty file (no image member)")
        current.clear()

    with fs.open_input_stream(inner) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:  # "|": a stream, no seeking
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.rpartition(".")
                    if key not in current:
                        yield from flush()
                        current[key] = (None, "")
                    if f".{ext.lower()}" not in IMAGE_EXTENSIONS:
                        continue
                    if member.size > max_member_bytes:
                        current[key] = (None, f"tar member {member.name} is {member.size} bytes, "
                                        f"over index_corpus.max_member_bytes={max_member_bytes}")  # fmt: skip
                        continue
                    try:
                        current[key] = (tar.extractfile(member).read(), "")
                    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
                        current[key] = (None, f"tar member {member.name} unreadable: {e}")
                        raise
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            yield from flush()
            yield f"{path}#unread", None, f"tar cut short or corrupt after the samples above: {e}"
            return
    yield from flush()


def read_tars(batch: dict, max_member_bytes: int):
    """map_batches generator: tar paths -> blocks of (image_id, image, read_error)."""
    rows: dict[str, list] = {"image_id": [], "image": [], "read_error": []}
    for path in batch["path"]:
        for key, data, error in tar_samples(str(path), max_member_bytes):
            rows["image_id"].append(key)
            rows["image"].append(data or b"")
            rows["read_error"].append(error)
            if len(rows["image_id"]) >= TAR_BATCH:
                yield _tar_block(rows)
                rows = {"image_id": [], "image": [], "read_error": []}
    if rows["image_id"]:
        yield _tar_block(rows)


def _tar_block(rows: dict) -> pa.Table:
    return pa.table(
        {
            "image_id": pa.array(rows["image_id"], pa.string()),
            "image": pa.array(rows["image"], pa.binary()),
            "read_error": pa.array(rows["read_error"], pa.string()),
        }
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
