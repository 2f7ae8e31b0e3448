"""Hostile inputs through the `lora2gguf` command (issue 15): links out of a model or run folder,
adapters whose merge would change nothing, safetensors headers whose byte ranges lie, and GGUF
files llama.cpp itself refuses.

Every bad file is a copy of the tiny fixtures' files edited byte by byte (struct, json), so the
only thing wrong with it is the planted fault. Each case checks exit status 2, one `error:` line
naming the file, every input byte-identical afterwards and nothing left behind (no output, report,
sidecar, temporary sibling or empty folder): the whole tree under the test's folder and the shared
fixtures are compared before and after.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import pytest

from conftest import refused, run_cli

from lora2gguf.cli import main

# --- helpers -----------------------------------------------------------------------------------------


def read_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_safetensors(path: Path, header: dict[str, Any], body: bytes) -> None:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def by_offset(header: dict[str, Any]) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def keep_tensors(path: Path, keep: Callable[[str], bool]) -> None:
    """Rewrite a safetensors file with only the tensors ``keep`` accepts, laid out validly."""
    header, body = read_safetensors(path)
    out: dict[str, Any] = {"__metadata__": header["__metadata__"]} if "__metadata__" in header else {}
    data = bytearray()
    for name in by_offset(header):
        if keep(name):
            begin, end = header[name]["data_offsets"]
            out[name] = {**header[name], "data_offsets": [len(data), len(data) + end - begin]}
            data += body[begin:end]
    write_safetensors(path, out, bytes(data))


def damage_safetensors(path: Path, damage: str) -> None:
    """Plant one lie about byte ranges; the JSON stays well-formed and every size stays right."""
    header, body = read_safetensors(path)
    first, second = by_offset(header)[:2]
    if damage == "negative-offsets":
        begin, end = header[first]["data_offsets"]
        header[first]["data_offsets"] = [begin - 16, end - 16]
    elif damage == "overlapping":
        # The second tensor starts 8 bytes early, inside the first one: same size, shared bytes.
        begin, end = header[second]["data_offsets"]
        header[second]["data_offsets"] = [begin - 8, end - 8]
    else:
        body += b"\0" * 64
    write_safetensors(path, header, body)


# GGUF files are reassembled from their parts: header, raw key/value records, tensor table, data.
_Tensor = tuple[str, tuple[int, ...], int, bytes]  # name, ggml shape (ne[0] first), type id, data


def gguf_parts(path: Path) -> tuple[list[bytes], list[_Tensor]]:
    """Raw key/value records and tensors of a GGUF, through gguf-py (not lora2gguf's reader)."""
    reader = gguf.GGUFReader(path, "r")
    records = [
        b"".join(part.tobytes() for part in field.parts)
        for key, field in reader.fields.items()
        if not key.startswith("GGUF.")
    ]
    tensors = [
        (t.name, tuple(int(n) for n in t.shape), int(t.tensor_type), bytes(t.data.tobytes())) for t in reader.tensors
    ]
    return records, tensors


def kv_record(key: str, vtype: gguf.GGUFValueType, value: int | str) -> bytes:
    raw = key.encode()
    if vtype == gguf.GGUFValueType.STRING:
        packed = struct.pack("<Q", len(str(value).encode())) + str(value).encode()
    else:
        packed = struct.pack({4: "<I", 10: "<Q"}[int(vtype)], value)
    return struct.pack("<Q", len(raw)) + raw + struct.pack("<I", int(vtype)) + packed


def assemble_gguf(
    records: list[bytes], tensors: list[_Tensor], alignment: int = 32, shift: dict[str, int] | None = None
) -> bytes:
    """A GGUF v3 laid out as llama.cpp requires (tensor data in table order, each start aligned),
    except that a tensor named in ``shift`` has its offset (and its data) moved by that many bytes."""
    shift = shift or {}
    offsets, position = [], 0
    for name, _, _, data in tensors:
        offsets.append(position + shift.get(name, 0))
        position = -(-(offsets[-1] + len(data)) // alignment) * alignment
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(records)))
    for record in records:
        out += record
    for (name, shape, type_id, _), offset in zip(tensors, offsets):
        out += struct.pack("<Q", len(name.encode())) + name.encode() + struct.pack("<I", len(shape))
        out += b"".join(struct.pack("<Q", n) for n in shape) + struct.pack("<IQ", type_id, offset)
    out += bytes(-len(out) % alignment)
    start = len(out)
    for (_, _, _, data), offset in zip(tensors, offsets):
        out += bytes(start + offset - len(out)) + data
    out += bytes(-len(out) % alignment)
    return bytes(out)


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def f16_gguf(f16_gguf: Path) -> Path:
    """conftest's F16 GGUF, once checked to be a file that the GGUF builder above reproduces byte for byte."""
    records, tensors = gguf_parts(f16_gguf)
    assert assemble_gguf(records, tensors) == f16_gguf.read_bytes(), "the GGUF builder must reproduce a valid file"
    return f16_gguf


def merge_argv(base: Path, adapter: Path, out_root: Path, eval_text: Path) -> list[str]:
    return ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out_root / "models" / "m-merged"),
            "--report", str(out_root / "results" / "merge_report.json"), "--eval-text", str(eval_text),
            "--device", "cpu"]  # fmt: skip


def secret_file(tmp_path: Path) -> Path:
    secret = tmp_path / "elsewhere" / "id_ed25519"
    secret.parent.mkdir()
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot really\n", encoding="utf-8")
    secret.chmod(0o600)
    return secret


# --- links out of a model or run folder --------------------------------------------------------------


def test_tokenizer_link_out_of_run_folder_refused_by_merge(
    tmp_path: Path, tiny_base: Path, tiny_run: Path, eval_text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tokenizer file that links to a private key elsewhere: its content would be copied into the
    merged folder, the one people publish."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    secret = secret_file(tmp_path)
    (run / "special_tokens_map.json").symlink_to(secret)
    line = refused(capsys, [tmp_path, tiny_base], *merge_argv(tiny_base, run, tmp_path, eval_text))
    assert line.startswith(f"{run / 'special_tokens_map.json'}: ") and "symbolic link to" in line, line
    assert str(secret) in line, line


def test_tokenizer_link_out_of_model_folder_refused_by_convert(
    tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = shutil.copytree(tiny_base, tmp_path / "model")
    secret = secret_file(tmp_path)
    (model / "tokenizer_config.json").unlink()
    (model / "tokenizer_config.json").symlink_to(secret)
    out = tmp_path / "gguf" / "model.gguf"
    line = refused(capsys, [tmp_path, tiny_base], "convert", model, out, "--no-progress")
    assert line.startswith(f"{model / 'tokenizer_config.json'}: ") and "symbolic link to" in line, line
    assert str(secret) in line, line


def test_weight_index_pointing_out_of_folder_refused(
    tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No link at all: the index names a shard outside the folder ("../")."""
    model = shutil.copytree(tiny_base, tmp_path / "model")
    outside = tmp_path / "model.safetensors"
    (model / "model.safetensors").rename(outside)
    names = list(read_safetensors(outside)[0])
    index = {"metadata": {}, "weight_map": {n: "../model.safetensors" for n in names if n != "__metadata__"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    out = tmp_path / "gguf" / "model.gguf"
    line = refused(capsys, [tmp_path, tiny_base], "convert", model, out, "--no-progress")
    assert line.startswith(f"{model / '../model.safetensors'}: ") and "outside" in line, line


def test_links_that_stay_inside_are_accepted(tmp_path: Path, tiny_base: Path) -> None:
    """A link to the whole folder, and the Hugging Face cache's snapshot -> blobs layout, still convert."""
    linked = tmp_path / "linked-model"
    linked.symlink_to(tiny_base, target_is_directory=True)
    assert main(["convert", str(linked), str(tmp_path / "a.gguf"), "--no-progress"]) == 0
    repo = tmp_path / "hub" / "models--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for source in tiny_base.iterdir():
        blob = repo / "blobs" / hashlib.sha256(source.name.encode()).hexdigest()
        shutil.copyfile(source, blob)
        (snapshot / source.name).symlink_to(Path("../../blobs") / blob.name)
    assert main(["convert", str(snapshot), str(tmp_path / "b.gguf"), "--no-progress"]) == 0


# --- adapters whose merge would change nothing -------------------------------------------------------


def _edit_config(run: Path, **changes: Any) -> None:
    config_path = run / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(changes)
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")


@pytest.mark.parametrize(
    ("case", "named", "expected"),
    [
        ("no-tensors", "adapter_model.safetensors", "no LoRA tensors"),
        ("no-lora-b", "adapter_model.safetensors", "has lora_A but no lora_B"),
        ("dora-without-magnitude", "adapter_model.safetensors", "use_dora but module"),
        ("zero-alpha", "adapter_config.json", "key 'lora_alpha' is 0"),
    ],
)
def test_adapter_that_changes_nothing_refused(
    tmp_path: Path,
    tiny_base: Path,
    tiny_run: Path,
    eval_text: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    named: str,
    expected: str,
) -> None:
    run = shutil.copytree(tiny_run, tmp_path / "run")
    weights = run / "adapter_model.safetensors"
    if case == "no-tensors":
        keep_tensors(weights, lambda name: False)
    elif case == "no-lora-b":
        keep_tensors(weights, lambda name: ".lora_B." not in name)
    elif case == "dora-without-magnitude":
        _edit_config(run, use_dora=True)
    else:
        _edit_config(run, lora_alpha=0)
    line = refused(capsys, [tmp_path, tiny_base], *merge_argv(tiny_base, run, tmp_path, eval_text))
    assert line.startswith(f"{run / named}: ") and expected in line, line


def test_negative_alpha_warns_and_is_recorded(
    tmp_path: Path, tiny_base: Path, tiny_run: Path, eval_text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A negative lora_alpha merges (peft subtracts the update), but never silently."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    _edit_config(run, lora_alpha=-8)
    status, log = run_cli(capsys, *merge_argv(tiny_base, run, tmp_path, eval_text))
    assert status == 0, log[-3000:]
    warnings = [line for line in log.splitlines() if "WARNING" in line and "lora_alpha is -8 (negative)" in line]
    assert warnings, log[-3000:]
    report = json.loads((tmp_path / "results" / "merge_report.json").read_text(encoding="utf-8"))
    assert len(report["adapter_warnings"]) == 1 and "lora_alpha is -8" in report["adapter_warnings"][0]
    assert report["adapter"]["lora_alpha"] == -8


# --- safetensors byte ranges that lie -----------------------------------------------------------------

DAMAGES = [
    ("negative-offsets", "data_offsets [-16,"),
    ("overlapping", "overlaps tensor"),
    ("trailing-bytes", "64 bytes after the last tensor"),
]


@pytest.mark.parametrize(("damage", "expected"), DAMAGES)
def test_lying_safetensors_refused_by_convert(
    tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str], damage: str, expected: str
) -> None:
    model = shutil.copytree(tiny_base, tmp_path / "model")
    damage_safetensors(model / "model.safetensors", damage)
    out = tmp_path / "gguf" / "model.gguf"
    argv = ["convert", model, out, "--no-progress", "--report", tmp_path / "results" / "convert.json"]
    line = refused(capsys, [tmp_path, tiny_base], *argv)
    assert line.startswith(f"{model / 'model.safetensors'}: ") and expected in line, line


@pytest.mark.parametrize(("damage", "expected"), DAMAGES)
def test_lying_safetensors_refused_by_merge(
    tmp_path: Path,
    tiny_base: Path,
    tiny_run: Path,
    eval_text: Path,
    capsys: pytest.CaptureFixture[str],
    damage: str,
    expected: str,
) -> None:
    run = shutil.copytree(tiny_run, tmp_path / "run")
    damage_safetensors(run / "adapter_model.safetensors", damage)
    line = refused(capsys, [tmp_path, tiny_base], *merge_argv(tiny_base, run, tmp_path, eval_text))
    assert line.startswith(f"{run / 'adapter_model.safetensors'}: ") and expected in line, line


# --- GGUF files llama.cpp refuses, given to quantize --------------------------------------------------


def _bad_gguf(case: str, records: list[bytes], tensors: list[_Tensor]) -> bytes:
    norm = next(i for i, t in enumerate(tensors) if t[2] == int(gguf.GGMLQuantizationType.F32) and len(t[1]) == 1)
    matrix = next(i for i, t in enumerate(tensors) if len(t[1]) == 2)
    u32, u64 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.UINT64
    if case == "alignment-not-power-of-two":
        return assemble_gguf([*records, kv_record("general.alignment", u32, 48)], tensors, alignment=48)
    if case == "alignment-wrong-type":
        return assemble_gguf([*records, kv_record("general.alignment", u64, 32)], tensors)
    if case == "misaligned-tensor-data":
        return assemble_gguf(records, tensors, shift={tensors[-1][0]: 2})
    if case == "duplicate-key":
        return assemble_gguf([*records, kv_record("general.name", gguf.GGUFValueType.STRING, "again")], tensors)
    if case == "duplicate-tensor-name":
        tensors = [*tensors, tensors[norm]]
    elif case == "integer-tensor-type":
        name, shape, _, data = tensors[norm]
        tensors = [*tensors[:norm], (name, shape, int(gguf.GGMLQuantizationType.I32), data), *tensors[norm + 1 :]]
    elif case == "zero-dimension":
        name, shape, type_id, _ = tensors[matrix]
        tensors = [*tensors[:matrix], (name, (shape[0], 0), type_id, b""), *tensors[matrix + 1 :]]
    elif case == "no-tensors":
        tensors = []
    return assemble_gguf(records, tensors)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("alignment-not-power-of-two", "general.alignment is 48, not a power of two"),
        ("alignment-wrong-type", "general.alignment has type UINT64, expected UINT32"),
        ("misaligned-tensor-data", "is not a multiple of the alignment 32"),
        ("duplicate-key", "metadata key general.name appears twice"),
        ("duplicate-tensor-name", "appears twice in the tensor table"),
        ("integer-tensor-type", "has type I32, which lora2gguf quantize does not handle"),
        ("zero-dimension", "has a zero dimension"),
        ("no-tensors", "holds no tensors"),
    ],
)
def test_gguf_llama_cpp_refuses_is_refused_by_quantize(
    tmp_path: Path, f16_gguf: Path, capsys: pytest.CaptureFixture[str], case: str, expected: str
) -> None:
    src = tmp_path / "in.gguf"
    src.write_bytes(_bad_gguf(case, *gguf_parts(f16_gguf)))
    out = tmp_path / "out" / "model-q8_0.gguf"
    sidecar = tmp_path / "out" / "model-q8_0.json"
    argv = ["quantize", src, out, "Q8_0", "--threads", "1", "--sidecar", sidecar]
    line = refused(capsys, [tmp_path, f16_gguf.parent], *argv)
    assert line.startswith(f"{src}: ") and expected in line, line


def test_gguf_with_a_valid_explicit_alignment_still_quantizes(
    tmp_path: Path, f16_gguf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """general.alignment as llama.cpp writes it (UINT32, a power of two other than 32) is fine."""
    records, tensors = gguf_parts(f16_gguf)
    src = tmp_path / "in.gguf"
    alignment = kv_record("general.alignment", gguf.GGUFValueType.UINT32, 64)
    src.write_bytes(assemble_gguf([*records, alignment], tensors, alignment=64))
    status, log = run_cli(capsys, "quantize", str(src), str(tmp_path / "q8.gguf"), "Q8_0", "--threads", "1")
    assert status == 0, log[-3000:]
    reader = gguf.GGUFReader(tmp_path / "q8.gguf", "r")
    assert reader.alignment == 64 and len(reader.tensors) == len(tensors)
