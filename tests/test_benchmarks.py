"""Every benchmark runs in --quick mode and writes JSON of the documented schema and a PNG.

Schema only: timings are never asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import cli


@pytest.mark.parametrize("name", cli.BENCHMARKS)
def test_benchmark_quick_writes_json_and_png(name: str, tmp_path: Path) -> None:
    assert cli.main([name, "--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / f"{name}.json").read_text())
    assert doc["benchmark"] == name
    assert {"cpu", "cores", "versions"} <= set(doc["machine"])
    assert doc["settings"] and doc["results"]
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
    if name == "state_size":
        red = doc["results"]["reduction_vs_pythia"]
        assert set(red) == {"pythia", "infini", "multi_memory", "hierarchical",
                            "context_pythia", "context_kv"}
        assert red["pythia"]["2048"] == 0
    if name == "decode":
        assert doc["results"]["greedy_tokens_equal_transformers"] is True
        assert set(doc["results"]["rows"]) >= {"pythia", "transformers_gpt_neox"}


def test_unknown_benchmark_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
