"""`scripts/recall_toy.py`'s evaluation at other gaps, its weights saved and loaded back (the
same scores from the saved model), and its gap curriculum."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest


def toy_module() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "scripts" / "recall_toy.py"
    spec = importlib.util.spec_from_file_location("recall_toy", path)
    assert spec is not None and spec.loader is not None
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    return toy


TINY = ["--batch-size", "4", "--segment", "8", "--gap", "2", "--eval-every", "1",
        "--eval-gaps", "1,3", "--eval-trials", "5", "--eval-chunk", "2"]


def test_eval_gaps_and_a_saved_model_scores_the_same_when_loaded(tmp_path: Path) -> None:
    toy = toy_module()
    out, again, folder = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "model"
    assert toy.main(["--steps", "2", *TINY, "--model-options", "memory_history=2",
                     "memory_write_gate=true", "memory_write_floor=0.01",
                     "--save", str(folder), "--out", str(out)]) == 0
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    first = json.loads(out.read_text())
    assert [r["step"] for r in first["curve"]] == [1, 2]
    gaps = first["eval_gaps"]
    assert set(gaps) == {"1", "3"}
    for row in gaps.values():
        assert row["trials"] == 5 and 0 <= row["exact"] <= row["first_token"] <= 1
    assert toy.main(["--steps", "0", *TINY, "--load", str(folder), "--out", str(again)]) == 0
    second = json.loads(again.read_text())
    assert second["curve"] == [] and second["settings"]["load"] == str(folder)
    for gap, row in gaps.items():  # the same trials, the same weights: the same scores
        assert {k: v for k, v in second["eval_gaps"][gap].items() if k != "seconds"} == \
            {k: v for k, v in row.items() if k != "seconds"}


def test_gap_curriculum_trains_and_bad_gaps_are_refused(tmp_path: Path) -> None:
    toy = toy_module()
    out = tmp_path / "c.json"
    assert toy.main(["--steps", "2", *TINY, "--gap-curriculum", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["gap_curriculum"] is True
    with pytest.raises(SystemExit):
        toy.main(["--steps", "1", "--eval-gaps", "4,x"])
