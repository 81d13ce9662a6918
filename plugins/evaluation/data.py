"""Edit triplets (source, target, instruction) through `datasets`: a local `imagefolder` or a hub dataset.

A local folder holds a `metadata.jsonl` whose rows name `source_file_name`, `target_file_name` and
`instruction` (`examples/toy_edits/`). A hub dataset keeps its own column names; `columns` maps ours to
them (MagicBrush: source=source_img, target=target_img, instruction=instruction). Optional
`source_caption` / `target_caption` columns feed the caption metrics of `icedit eval`. `icedit train`
reads its examples through here too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from assistant.errors import UserError, WeightsMissing

COLUMNS = ("source", "target", "instruction", "source_caption", "target_caption")
REQUIRED = ("source", "instruction")


def parse_columns(text: str | None) -> dict[str, str]:
    """`source=source_img,target=target_img` -> {"source": "source_img", ...} (our name = theirs)."""
    mapping: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        ours, sep, theirs = part.partition("=")
        if not sep or not theirs.strip() or ours.strip() not in COLUMNS:
            raise UserError(f"--columns: '{part}' is not NAME=COLUMN with NAME one of {', '.join(COLUMNS)}")
        mapping[ours.strip()] = theirs.strip()
    return mapping


@contextmanager
def _offline() -> Iterator[None]:
    """Hub look-ups answered from the cache only, so an unreachable hub fails at once, not after retries."""
    import datasets.config
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def load_edits(
    data: str,
    columns: dict[str, str] | None = None,
    split: str = "train",
    limit: int | None = None,
    need_target: bool = True,
):
    """A `datasets.Dataset` with columns source, target (when there), instruction and any captions."""
    import datasets
    from datasets import load_dataset

    from assistant.hub import first_line, offline_mode, reachable

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    path = Path(data).expanduser()
    if path.is_dir():
        if not (path / "metadata.jsonl").is_file():
            raise UserError(f"{data}: no metadata.jsonl in it (see examples/toy_edits/ for the layout)")
        try:
            dataset = load_dataset("imagefolder", data_dir=str(path), split=split)
        except Exception as e:  # noqa: BLE001 - a bad folder is one line
            raise UserError(f"cannot read the edits in {data}: {first_line(e)}") from None
    elif data.startswith((".", "/", "~")) or data.count("/") != 1:
        raise UserError(f"{data}: no such folder (or a hub dataset id like osunlp/MagicBrush)")
    else:
        try:
            if reachable():
                dataset = load_dataset(data, split=split)
            else:
                with _offline():
                    dataset = load_dataset(data, split=split)
        except Exception as e:  # noqa: BLE001 - hub clients raise OSError, ValueError or their own errors
            if reachable():
                raise UserError(
                    f"cannot load the dataset '{data}' (split {split}): {first_line(e)}"
                ) from None
            why = "offline mode is set (HF_HUB_OFFLINE)" if offline_mode() else "the hub is unreachable"
            raise WeightsMissing(
                f"the dataset '{data}' is not in the Hugging Face cache and {why}: download it on "
                f"a machine with internet (`hf download --repo-type dataset {data}`) or pass a local folder"
            ) from None
    mapping = {ours: (columns or {}).get(ours, ours) for ours in COLUMNS}
    needed = (*REQUIRED, "target") if need_target else REQUIRED
    for ours in needed:
        if mapping[ours] not in dataset.column_names:
            raise UserError(
                f"{data} has no column '{mapping[ours]}' for the {ours} (columns: "
                f"{', '.join(dataset.column_names)}); map it with --columns {ours}=COLUMN"
            )
    keep = {theirs: ours for ours, theirs in mapping.items() if theirs in dataset.column_names}
    dataset = dataset.select_columns(list(keep)).rename_columns({t: o for t, o in keep.items() if t != o})
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if len(dataset) == 0:
        raise UserError(f"{data} (split {split}) has no examples")
    return dataset


def example(edits, index: int) -> dict:
    """Row `index` with its images decoded now: `datasets` and PIL decode lazily, so a file that is not an
    image would otherwise fail deep inside a training step or an edit; here it is one line naming the row."""
    from assistant.hub import first_line

    try:
        row = edits[index]
    except Exception as e:  # noqa: BLE001 - datasets raises whatever its image decoder raised
        raise UserError(f"example {index + 1} of the dataset cannot be read: {first_line(e)}") from None
    for column in ("source", "target"):
        if row.get(column) is None:
            continue
        try:
            row[column].load()
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bad data; all mean "not an image"
            raise UserError(
                f"example {index + 1} of the dataset: its {column} is not a readable image ({first_line(e)})"
            ) from None
    return row
