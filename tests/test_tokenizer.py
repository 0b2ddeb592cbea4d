"""The tokenizer wrapper: byte-level round trips, EOS, hashing, and files transformers can read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from newllm.tokenizer import Tokenizer, byte_to_unicode

SAMPLES = [
    "",
    "hello world",
    "naïve café — 日本語のテキスト 🙂👍🏽 ",
    "tabs\tand\r\nnewlines\n\n  leading spaces",
    "\x00\x01\x7f control bytes",
    "e\u0301 combining, \u200b zero width, \ufeff BOM",
    "text<|endoftext|>more",
]


def test_byte_level_ids(byte_tokenizer: Tokenizer) -> None:
    assert byte_tokenizer.eos_token_id == 0
    assert byte_tokenizer.vocab_size == 257
    assert byte_tokenizer.encode("A") == [ord("A") + 1]
    assert byte_tokenizer.encode("é") == [b + 1 for b in "é".encode()]
    assert byte_tokenizer.encode("<|endoftext|>") == [0]
    assert byte_tokenizer.decode([0]) == "<|endoftext|>"
    assert byte_tokenizer.decode([ord("h") + 1, 0], skip_special_tokens=True) == "h"


def test_alphabet_is_a_bijection() -> None:
    table = byte_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_level_round_trip(byte_tokenizer: Tokenizer, text: str) -> None:
    ids = byte_tokenizer.encode(text)
    assert all(0 <= i < 257 for i in ids)
    assert byte_tokenizer.decode(ids) == text
    if "<|endoftext|>" not in text:
        assert ids == [b + 1 for b in text.encode("utf-8")]


@settings(max_examples=200, deadline=None, database=None)
@given(st.text())
def test_byte_level_round_trip_any_text(text: str) -> None:
    tok = Tokenizer.byte_level()
    assert tok.decode(tok.encode(text)) == text


def test_save_load_same_hash_and_ids(byte_tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = byte_tokenizer.save(tmp_path / "tokenizer.json")
    assert path.read_text(encoding="utf-8")  # a real file
    again = Tokenizer.from_file(path)
    assert again.sha256 == byte_tokenizer.sha256
    assert again.eos_token_id == 0 and again.vocab_size == 257
    for text in SAMPLES:
        assert again.encode(text) == byte_tokenizer.encode(text)
    # a folder works too, and saving into one writes tokenizer.json there
    (tmp_path / "folder").mkdir()
    assert byte_tokenizer.save(tmp_path / "folder").name == "tokenizer.json"
    assert Tokenizer.from_file(tmp_path / "folder").sha256 == byte_tokenizer.sha256


def test_hash_tracks_content(byte_tokenizer: Tokenizer, tmp_path: Path) -> None:
    data = json.loads(byte_tokenizer.backend.to_str())
    data["added_tokens"].append({"id": 257, "content": "<|pad|>", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False,
                                 "special": True})
    other = Tokenizer.from_str(json.dumps(data))
    assert other.vocab_size == 258
    assert other.sha256 != byte_tokenizer.sha256


def test_transformers_reads_saved_file(byte_tokenizer: Tokenizer, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    path = byte_tokenizer.save(tmp_path / "tokenizer.json")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in SAMPLES:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == byte_tokenizer.encode(text)
        assert hf.decode(ids) == byte_tokenizer.decode(ids)


def test_eos_detection_and_errors(byte_tokenizer: Tokenizer, tmp_path: Path) -> None:
    data = json.loads(byte_tokenizer.backend.to_str())
    data["added_tokens"][0]["content"] = "</s>"
    data["model"]["vocab"]["</s>"] = data["model"]["vocab"].pop("<|endoftext|>")
    assert Tokenizer.from_str(json.dumps(data)).eos_token_id == 0
    data["added_tokens"][0]["content"] = "<mystery>"
    data["model"]["vocab"]["<mystery>"] = data["model"]["vocab"].pop("</s>")
    with pytest.raises(ValueError, match="eos_token_id="):
        Tokenizer.from_str(json.dumps(data))
    assert Tokenizer.from_str(json.dumps(data), eos_token_id=0).eos_token_id == 0
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        Tokenizer.from_str(json.dumps(data), eos_token_id=257)
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_str("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path / "missing.json")
