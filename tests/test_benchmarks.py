"""Every benchmark runs in --quick mode and writes JSON of the documented schema and a PNG; the
README's Performance section is what `benchmarks.report` generates from the results.

Schema only: timings are never asserted. The quick runs share one results folder, which the
report test then renders."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import need_program

from benchmarks import cli, report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


def _check_schema(name: str, doc: dict) -> None:
    res, settings = doc["results"], doc["settings"]
    if name == "state_size":
        red = res["reduction_vs_pythia"]
        assert set(red) == {"pythia", "infini", "multi_memory", "hierarchical",
                            "context_pythia", "context_kv"}
        assert red["pythia"]["2048"] == 0
    if name == "decode":
        kinds = {"pythia", "infini", "multi_memory", "hierarchical", "context_pythia",
                 "context_kv"}
        assert res["greedy_tokens_equal_transformers"] is True
        assert res["greedy_tokens_compared"] >= len(settings["contexts"])
        assert set(res["rows"]) == kinds | {"transformers_gpt_neox"}
        assert set(settings["presets"]) == kinds
        contexts = [str(n) for n in settings["contexts"]]
        for rows in res["rows"].values():
            assert [r["context"] for r in rows] == settings["contexts"]
            for r in rows:
                assert settings["min_steps"] <= r["steps"] <= settings["steps"]
                assert r["ms_per_token"] > 0 and r["tokens_per_s"] > 0
        assert list(res["pythia_speedup_vs_transformers"]) == contexts
        assert set(res["speed_vs_pythia"]) == kinds - {"pythia"}
        assert all(list(by) == contexts for by in res["speed_vs_pythia"].values())
        assert set(res["slowdown_longest_vs_shortest"]) == set(res["rows"])
        # memory kinds keep a state of constant size; pythia's and context_kv's grow
        assert res["constant_state_kinds"] == ["infini", "multi_memory", "hierarchical"]
        flat = res["goals"]["constant_state_kinds_flat"]
        assert flat["kinds"] == res["constant_state_kinds"]
        assert flat["met"] == (flat["value"] <= flat["target"])
        assert "pythia_vs_transformers" not in res["goals"]  # 1,024 is not a quick context
        assert settings["our_weight_layout"].startswith("input-major")
        # our pythia and transformers are measured in turns: the same number of steps
        assert [r["steps"] for r in res["rows"]["pythia"]] == \
            [r["steps"] for r in res["rows"]["transformers_gpt_neox"]]
        batch = res["batched_tokens_per_s"]
        assert set(batch) == {"pythia", "infini"}
        assert all(list(by) == [str(b) for b in settings["batched_sessions"]]
                   for by in batch.values())
    if name == "latency":
        assert [c["threads"] for c in res["threads"]] == [1]  # quick: one child
        for c in res["threads"]:
            assert set(c["step_ms"]) == {"weights_floor", "forward_eager", "slots_eager",
                                         "slots_compiled", "weights_floor_half",
                                         "slots_compiled_half"}
            assert all(v > 0 for v in c["step_ms"].values())
            assert set(c["step_ms_alternating"]) == set(c["step_ms"])
            assert c["weights_mib_half"] == c["weights_mib"] / 2
            assert list(c["slots_ms"]) == [str(b) for b in settings["batch_sizes"]]
            assert set(c["generate_tokens_per_s"]) == {"eager", "compiled", "compiled_half"}
        pythia = res["threads"][0]["pythia_70m"]
        assert pythia["greedy_tokens_agree"] is True
        assert set(pythia["ms_per_token"]) == {"ours_eager", "ours_compiled", "transformers",
                                               "weights_floor", "ours_compiled_half",
                                               "weights_floor_half"}
        assert all(v > 0 for v in pythia["ms_per_token"].values()) and pythia["weights_mib"] > 0
        for r in res["server_single_stream"].values():
            assert r["first_request_ttft_s"] > 0 and r["turns"] > 0
        assert {"step_ms", "generate_tokens_per_s", "server_vs_generate"} <= set(res["goals"])
        assert "pythia_vs_transformers" not in res["goals"]  # quick mode's pythia is tiny
        assert settings["half_weights"] == "measured"
    if name == "prefill":
        assert res["last_logits_equal_transformers"] is True
        assert set(res["rows"]) >= {"pythia", "infini", "transformers_gpt_neox"}
        for rows in res["rows"].values():
            assert [r["tokens"] for r in rows] == settings["lengths"]
            assert all(r["tokens_per_s"] > 0 for r in rows)
        assert set(res["pythia_speedup_vs_transformers"]) == {str(n) for n in settings["lengths"]}
    if name == "transfer":
        lengths = settings["lengths"]
        for part in ("library", "server", "pythia"):
            assert [r["tokens"] for r in res[part]] == lengths
        assert all(r["round_trip_exact"] is True for r in res["library"])
        assert all(r["tokens_seen"] == r["tokens"] == r["imported_tokens_seen"]
                   for r in res["server"])
        # a memory model's file stays bounded while Pythia's KV cache grows with the text
        assert res["server"][-1]["file_bytes"] < res["pythia"][-1]["same_shape_kv_bytes"]
        assert res["pythia"][-1]["same_shape_kv_bytes"] > res["pythia"][0]["same_shape_kv_bytes"]
    if name == "server":
        assert set(res["rows"]) == {"batching_off", "batching_on"}
        assert res["errors"] == 0 and res["all_memory_files_valid"] is True
        for rows in res["rows"].values():
            assert [r["clients"] for r in rows] == settings["clients"]
            for r in rows:
                assert r["requests"] > 0 and r["errors"] == 0
                assert set(r["ttft_ms"]) == set(r["latency_ms"]) == {"p50", "p95", "p99"}
        for files in res["memory_files"].values():
            assert files["checked"] == files["valid"] > 0 and not files["missing"]
        assert list(res["batching_speedup"]) == [str(n) for n in settings["clients"]]
        assert settings["max_batch_size"]["batching_off"] == 1
        assert settings["max_batch_size"]["batching_on"] > 1
        assert settings["request_timeout_s"] > 0
    if name == "quality":
        rows = {r["name"]: r for r in res["rows"]}
        assert set(rows) == {"tiny-infini", "tiny-pythia"}
        assert settings["layout"].startswith("input-major")  # timed as the server runs them
        for r in rows.values():
            assert {"ppl", "parameters", "state_bytes_16384", "decode_ms_per_token"} <= set(r)
        assert set(rows["tiny-infini"]["passkey"]) == {"0", "1"}
        assert "memory_ppl_ratio" in rows["tiny-infini"]
        assert rows["tiny-infini"]["state_bytes_16384"] < rows["tiny-pythia"]["state_bytes_16384"]
    if name == "engine":
        rows = res["tokens_per_s"]
        assert list(rows) == [str(n) for n in settings["sessions"]]
        assert all({"batched_state", "slots", "decode_step"} <= set(r) for r in rows.values())
        assert res["slots_max_abs_logit_diff"] <= 1e-4
        assert res["prefill_chunk_chosen"] > 0 and res["prefill_chunks"]
    if name == "pointer":
        assert set(res["state_bytes"]) == {"without", "with_pointer"}
        assert res["state_ratio"] > 1  # the pointer's masses come on top of the model's state
        assert list(res["decode_tokens_per_s"]) == [str(n) for n in settings["sessions"]]
        assert all(set(r) == {"without", "with_pointer"}
                   for r in res["decode_tokens_per_s"].values())
        assert set(res["training_step_s"]) == {"whole_mixture", "targets_alone"}
        assert res["slots_max_abs_logit_diff"] <= 1e-4
    if name == "chat":
        modes = {"stateless_no_cache", "stateless_cache", "responses_chain", "session"}
        assert set(res["rows"]) == modes
        for rows in res["rows"].values():
            assert [r["turn"] for r in rows] == list(range(1, settings["turns"] + 1))
            assert all(r["ms"] > 0 and 0 < r["read_tokens"] <= r["prompt_tokens"] for r in rows)
        # without the cache every turn reads the whole history; with it, less from turn 2
        plain, cached = res["rows"]["stateless_no_cache"], res["rows"]["stateless_cache"]
        assert all(r["read_tokens"] == r["prompt_tokens"] for r in plain)
        assert all(c["read_tokens"] < c["prompt_tokens"] for c in cached[1:])
        assert set(res["goals"]) == {"cache_last_vs_turn2", "chain_last_vs_turn2",
                                     "resent_history_skipped"}
    if name == "store":
        assert [r["tokens"] for r in res["per_turn"]] == settings["lengths"]
        for r in res["per_turn"]:
            assert r["folder_ms"] > 0 and r["redis_ms"] > 0 and r["file_bytes"] > 0
        assert set(res["rows"]) == {"folder", "redis_1_replica", "redis_2_replicas"}
        assert res["errors"] == 0
        for rows in res["rows"].values():
            assert [r["clients"] for r in rows] == settings["clients"]
            assert all(r["requests"] > 0 and r["errors"] == 0 for r in rows)
        assert set(res["tokens_per_s_vs_folder"]) == {"redis_1_replica", "redis_2_replicas"}
    if name == "move":
        assert res["answers_identical_after_move"] is True and not res["mismatches"]
        assert list(res["by_distance"]) == [str(d) for d in settings["distances_segments"]]
        for acc in res["by_distance"].values():
            assert set(acc) == {"moved", "not_moved", "reset"}
            assert all(0 <= v <= 1 for v in acc.values())
            assert acc["moved"] == acc["not_moved"]
        precision = res["precision_moves"]
        assert set(precision) == {"bfloat16->float32", "float32->bfloat16", "float16->float32"}
        for r in precision.values():
            assert 0 <= r["greedy_identical_to_written"] <= 1
            assert r["ppl_moved"] > 1 and r["ppl_written"] > 1
        chat = res["chat"]
        assert chat["conversations"] == settings["chat_conversations"]
        assert all(0 <= chat[k] <= 1 for k in ("moved", "floor", "library"))
        assert chat["replies_same_as_library"] == 1.0  # server turns = the library's emulation
        kinds = chat["by_kind"]
        assert set(kinds) <= {"digits", "words"} and kinds
        assert sum(k["conversations"] for k in kinds.values()) == chat["conversations"]
        for k in ("moved", "floor", "library"):  # the split adds up to the whole
            total = sum(row[k] * row["conversations"] for row in kinds.values())
            assert total == pytest.approx(chat[k] * chat["conversations"])


@pytest.mark.parametrize("name", cli.BENCHMARKS)
def test_benchmark_quick_writes_json_and_png(name: str, quick_results: Path) -> None:
    if name == "store":
        need_program("redis-server", "redis-server")
    compile_setting = os.environ.get("NEWLLM_COMPILE")
    assert cli.main([name, "--quick", "--out", str(quick_results)]) == 0
    # a benchmark that sets it for its servers leaves it as it was (later tests' servers)
    assert os.environ.get("NEWLLM_COMPILE") == compile_setting
    doc = json.loads((quick_results / f"{name}.json").read_text())
    assert doc["benchmark"] == name
    assert {"cpu", "cores", "versions"} <= set(doc["machine"])
    assert doc["settings"] and doc["results"]
    assert (quick_results / f"{name}.png").stat().st_size > 1000
    _check_schema(name, doc)


def test_report_renders_every_result(quick_results: Path) -> None:
    for name in cli.BENCHMARKS:  # when run on its own, make the results first
        if name == "store" and shutil.which("redis-server") is None:
            continue
        if not (quick_results / f"{name}.json").is_file():
            assert cli.main([name, "--quick", "--out", str(quick_results)]) == 0
    text = report.markdown(quick_results)
    assert text == report.markdown(quick_results)  # deterministic
    for name in cli.BENCHMARKS:
        title, _ = report.SECTIONS[name]
        assert f"### {title}" in text
        assert f"({report.PLOTS}/{name}.png)" in text
    assert "(quick mode)" in text
    decode = text.split("### Decode speed")[1].split("###")[0]
    assert "| slowdown (128 / 32) |" in decode and "constant-state kinds" in decode
    assert "| `pythia` |" in decode and "| `infini` |" in decode  # batched decode per kind
    server = text.split("### Server under load")[1].split("###")[0]
    assert "| 4 | on (32) |" in server and "Batching speed-up" in server
    latency = text.split("### One conversation")[1].split("###")[0]
    assert "weights floor" in latency and "First request's time to first token" in latency
    engine = text.split("### Batched decoding (slots)")[1].split("###")[0]
    assert "slots / ceiling" in engine and "| 128 |" in engine  # the prefill pieces
    assert report.markdown(quick_results / "empty").startswith("No benchmark results")


def test_report_replaces_only_the_marked_section() -> None:
    readme = f"# x\n\n## Performance\n\n{report.START}\nold\n{report.END}\n\n## After\n"
    new = report.replace_section(readme, "new table\n")
    assert report.readme_section(new) == "new table\n"
    assert new.startswith("# x\n\n## Performance\n\n") and new.endswith("\n\n## After\n")
    with pytest.raises(ValueError, match="markers"):
        report.replace_section("# no markers\n", "x\n")


def test_readme_performance_section_matches_results() -> None:
    text = (ROOT / "README.md").read_text()
    section = report.readme_section(text)
    if section is None:
        pytest.skip("README.md has no perf markers yet; add them and run "
                    "python -m benchmarks.report --write-readme README.md")
    assert section == report.markdown(), ("README's Performance section is stale: run "
                                          "python -m benchmarks.report --write-readme README.md")


def test_unknown_benchmark_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_interleaved_steps_decode_like_separate_runs() -> None:
    import torch

    from benchmarks.decode import greedy_steps, interleaved_steps, ours_step
    from newllm import ModelConfig, TransformerLM

    torch.manual_seed(0)
    a = TransformerLM(ModelConfig.from_name("tiny-pythia")).eval()
    b = TransformerLM(ModelConfig.from_name("tiny-infini")).eval()
    ids = torch.randint(0, 500, (1, 20))
    with torch.no_grad():
        (la, sa), (lb, sb) = a(ids), b(ids)
    both = interleaved_steps({"a": ours_step(a, sa), "b": ours_step(b, sb)},
                             {"a": la, "b": lb}, 6, warmup=1)
    assert both["a"][1] == greedy_steps(ours_step(a, sa), la, 6, warmup=1)[1]
    assert both["b"][1] == greedy_steps(ours_step(b, sb), lb, 6, warmup=1)[1]
    assert len(both["a"][0]) == len(both["b"][0]) == 6 and len(both["a"][1]) == 7


def test_latency_leaves_half_weights_out_where_they_cannot_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import latency
    from newllm import half_weights

    monkeypatch.setattr(half_weights, "kernel_problem", lambda: "no AVX2 on this CPU (test)")
    assert latency.main(["--quick", "--no-server", "--no-pythia", "--out", str(tmp_path)]) == 0
    assert "half weights are not measured: no AVX2 on this CPU (test)" in capsys.readouterr().out
    doc = json.loads((tmp_path / "latency.json").read_text())
    assert doc["settings"]["half_weights"] == "not measured: no AVX2 on this CPU (test)"
    child = doc["results"]["threads"][0]
    assert set(child["step_ms"]) == {"weights_floor", "forward_eager", "slots_eager",
                                     "slots_compiled"}
    assert set(child["generate_tokens_per_s"]) == {"eager", "compiled"}
    assert all(set(by) == {"eager", "compiled"} for by in child["slots_ms"].values())
    assert set(doc["results"]["goals"]) == {"step_ms", "generate_tokens_per_s"}
    assert (tmp_path / "latency.png").stat().st_size > 1000


def test_quality_keeps_earlier_rows_it_does_not_replace(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--keep: a new run replaces the rows it produces and carries the others over as they
    were, marked with their date, and the report says which rows are kept."""
    from benchmarks import quality

    old = tmp_path / "old"
    assert quality.main(["--quick", "--out", str(old), "--evaluate", "tiny-pythia"]) == 0
    doc = json.loads((old / "quality.json").read_text())
    new = tmp_path / "new"
    assert quality.main(["--quick", "--out", str(new), "--evaluate", "tiny-infini",
                         "--keep", str(old / "quality.json")]) == 0
    rows = {r["name"]: r for r in json.loads((new / "quality.json").read_text())
            ["results"]["rows"]}
    assert set(rows) == {"tiny-infini", "tiny-pythia"}
    assert "kept_from" not in rows["tiny-infini"]  # measured in this run
    assert rows["tiny-pythia"] == {**doc["results"]["rows"][0], "kept_from": {
        "file": str(old / "quality.json"), "date": doc["date"], "machine": doc["machine"]}}
    text = report.markdown(new)
    assert f"tiny-pythia ({doc['date'][:10]})" in text and "Kept from an earlier run" in text
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a quality result"):
        quality.main(["--quick", "--out", str(new), "--keep", str(tmp_path / "bad.json")])
