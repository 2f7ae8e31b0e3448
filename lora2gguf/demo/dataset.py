"""The demo dataset: bilingual (Chinese/English) student counselling dialogues shipped with the package.

Records are ShareGPT-style (the layout LLaMA-Factory reads with ``formatting: sharegpt``)::

    {"id": ..., "lang": "en"|"zh", "topic": ..., "risk": bool,
     "conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}

The held-out split is fixed (two files), so every evaluation and every run sees the same eval set.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from lora2gguf.errors import Lora2ggufError

logger = logging.getLogger(__name__)

SPLITS = ("train", "eval")
DATA_FILES = {split: f"counsel_{split}.jsonl" for split in SPLITS}
DATASET_NAME = "student_counsel"
_ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


def data_dir() -> Path:
    """The folder of the packaged dataset files."""
    return Path(str(resources.files("lora2gguf.demo") / "data"))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise Lora2ggufError(f"demo dataset: unknown split {split!r} (expected one of {', '.join(SPLITS)})")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read and validate a ShareGPT JSONL file; errors name the file, line and key."""
    records: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise Lora2ggufError(f"{path}: cannot read: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise Lora2ggufError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list) or not turns:
            raise Lora2ggufError(f"{path}:{number}: key 'conversations' missing or empty")
        for index, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("from") not in _ROLE or not isinstance(turn.get("value"), str):
                raise Lora2ggufError(
                    f"{path}:{number}: conversations[{index}] needs 'from' (human/gpt/system) and a string 'value'"
                )
        if turns[-1]["from"] != "gpt":
            raise Lora2ggufError(f"{path}:{number}: conversations must end with a 'gpt' turn")
        records.append(record)
    return records


def load_dataset_split(split: str, path: Path | None = None) -> list[dict[str, Any]]:
    """The dialogues of one split ('train' or 'eval'); ``path`` overrides the packaged file."""
    _check_split(split)
    return read_jsonl(path if path is not None else data_dir() / DATA_FILES[split])


def to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """A record as chat messages ({'role', 'content'}) for tokenizer.apply_chat_template."""
    messages = [{"role": _ROLE[t["from"]], "content": t["value"]} for t in record["conversations"]]
    if record.get("system"):
        messages.insert(0, {"role": "system", "content": record["system"]})
    return messages


def render_dialogue(record: dict[str, Any]) -> str:
    """One dialogue as plain text: its turns, one paragraph each (no role labels, no template)."""
    return "\n".join(t["value"] for t in record["conversations"])


def render_text(split: str) -> str:
    """A whole split as plain UTF-8 text (for perplexity evaluation and quantization calibration)."""
    return "\n\n".join(render_dialogue(r) for r in load_dataset_split(split)) + "\n"


def dataset_info() -> dict[str, Any]:
    """LLaMA-Factory's dataset_info.json entries for the two split files."""
    columns = {"messages": "conversations"}
    tags = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}
    return {
        f"{DATASET_NAME}_{split}": {
            "file_name": DATA_FILES[split],
            "formatting": "sharegpt",
            "columns": columns,
            "tags": tags,
        }
        for split in SPLITS
    }


def write_demo_data(out_dir: Path) -> Path:
    """Write resources/demo/data-style outputs into ``out_dir`` (which must be a fresh folder).

    {train,eval}.jsonl (copies of the packaged splits), {train,eval}.txt (render_text),
    dataset_info.json (LLaMA-Factory registration of the jsonl files).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {}
    for split in SPLITS:
        records = load_dataset_split(split)
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        (out_dir / f"{split}.txt").write_text(render_text(split), encoding="utf-8")
        entry = dataset_info()[f"{DATASET_NAME}_{split}"]
        info[f"{DATASET_NAME}_{split}"] = dict(entry, file_name=f"{split}.jsonl")
        logger.info("demo data: %s split, %d dialogues", split, len(records))
    (out_dir / "dataset_info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir
