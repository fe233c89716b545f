"""Every benchmark subcommand end to end on the tiny model (``--tiny``: a random 2-layer
Llama with SmolLM2's tokenizer), in-process, in seconds: the CSV, JSON, markdown and PNG
files exist and parse, and their numbers mean what they say (the decode-path perplexity of
the full cache equals a one-forward reference, a ratio-0 eviction cache equals the full
cache, ratios against kvpress are ours / theirs)."""

from __future__ import annotations

import csv
import json
import math
import tomllib
from pathlib import Path

import pytest
import torch

from kvpress_rs.bench import micro, needle, ppl, report, speed
from kvpress_rs.bench.specs import Method, expand, parse_spec
from kvpress_rs.errors import InvalidArgumentError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """--threads 1 sets torch's global count: restore it for the other tests."""
    before = torch.get_num_threads()
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")
    yield
    torch.set_num_threads(before)


def read_outputs(folder: Path, command: str) -> tuple[list[dict], dict]:
    for ext in ("csv", "json", "md", "png"):
        assert (folder / f"{command}.{ext}").stat().st_size > 0, ext
    with (folder / f"{command}.csv").open() as f:
        rows = list(csv.DictReader(f))
    data = json.loads((folder / f"{command}.json").read_text())
    assert data["meta"]["command"].startswith(f"python -m kvpress_rs.bench {command}")
    assert data["meta"]["date"] and data["meta"]["machine"]
    assert len(rows) == len(data["rows"])
    assert (folder / f"{command}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(folder / f"{command}.png")
    assert image.shape[0] > 100 and image.shape[1] > 100
    md = (folder / f"{command}.md").read_text()
    assert data["meta"]["command"] in md and md.count("\n|") >= 2
    return rows, data


COMMON = ["--tiny", "--threads", "1", "--quiet", "--no-kvpress"]


def test_needle_end_to_end(tmp_path):
    out = needle.main([*COMMON, "--lengths", "200", "--depths", "0.2", "0.8", "--ratios", "0.5",
                       "--methods", "full", "knorm", "snapkv:window_size=8", "quantized:bits=4", "--max-new-tokens", "3",
                       "--out", str(tmp_path)])
    rows, data = read_outputs(tmp_path, "needle")
    assert [r["method"] for r in rows] == [m for m in ["full", "knorm@0.5", "snapkv:window_size=8@0.5", "quantized:bits=4"] for _ in range(2)]
    assert {r["found"] for r in rows} <= {"0", "1"}
    summary = {r["method"]: r for r in data["summary"]}
    assert summary["full"]["kv_fraction"] == 1.0  # DynamicCache bytes == the formula's
    # half of the tokens, plus the int32 position of each kept token (4 bytes per 2*64 bf16)
    assert summary["knorm@0.5"]["kv_fraction"] == pytest.approx(0.5 * (256 + 4) / 256, abs=0.01)
    assert summary["knorm@0.5"]["tasks"] == 2 and 0 <= summary["knorm@0.5"]["found"] <= 2
    assert out["paths"]["png"].exists()


def test_needle_query_aware_moves_the_question_into_the_context():
    from kvpress_rs.models import load_model

    _, tokenizer = load_model("tiny")
    plain = needle.make_tasks(tokenizer, [200], [0.5], query_aware=False)[0]
    aware = needle.make_tasks(tokenizer, [200], [0.5], query_aware=True)[0]
    assert len(aware["question_ids"]) == 1
    assert aware["context_ids"] + aware["question_ids"] == plain["context_ids"] + plain["question_ids"]


def test_ppl_end_to_end_matches_a_one_forward_reference(tmp_path):
    out = ppl.main([*COMMON, "--dtype", "float32", "--corpus", "essays", "--lengths", "96", "--offsets", "0", "500",
                    "--continuation", "12", "--ratios", "0.0", "0.5", "--methods", "full", "knorm", "quantized:bits=2",
                    "--out", str(tmp_path)])
    rows, data = read_outputs(tmp_path, "ppl")
    assert len(rows) == 4 * 2 and all(int(r["tokens"]) == 12 for r in rows)
    summary = {r["method"]: r for r in data["summary"]}
    assert summary["full"]["ppl_ratio"] == 1.0
    assert summary["quantized:bits=2"]["bits"] == 2.0 and summary["full"]["bits"] == 16.0
    # ratio 0 evicts nothing: the same decode path gives the same perplexity
    assert summary["knorm@0"]["ppl"] == pytest.approx(summary["full"]["ppl"], rel=1e-4)
    assert summary["knorm@0.5"]["ppl"] != summary["full"]["ppl"]

    # independent reference: one forward over prefix + continuation, no cache
    from kvpress_rs.models import load_model

    model, tokenizer = load_model("tiny", dtype="float32")
    ids = ppl.corpus_ids(tokenizer, "essays")
    nll = []
    for offset in (0, 500):
        x = torch.tensor([ids[offset : offset + 96 + 12]])
        with torch.no_grad():
            logp = torch.log_softmax(model(x).logits[0, 95:-1].float(), -1)
        nll += (-logp.gather(1, x[0, 96:, None])[:, 0]).tolist()
    assert summary["full"]["ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)
    assert out["summary"] == data["summary"]


def test_ppl_and_needle_ratios_against_kvpress_are_ours_over_theirs(tmp_path, monkeypatch):
    """kvpress's side is replaced by fixed answers: the rows, summaries and ratios are built
    from them as from a real run."""
    from kvpress_rs.bench.cli import Run

    requests = []

    def fake_kvpress(self, mode, presses, **request):
        requests.append((mode, presses))
        if mode == "ppl":
            return [{"press": p, "sample": s["name"], "nll": [math.log(10.0)] * len(s["continuation_ids"]), "kv_bytes": 1}
                    for p in presses for s in request["samples"]]
        ids = self.tokenizer(" 4817263", add_special_tokens=False)["input_ids"]
        return [{"press": p, "task": t["name"], "answer_ids": ids, "kv_bytes": 1} for p in presses for t in request["tasks"]]

    monkeypatch.setattr(Run, "kvpress", fake_kvpress)
    args = ["--tiny", "--threads", "1", "--quiet", "--ratios", "0.5"]
    out = ppl.main([*args, "--corpus", "essays", "--lengths", "64", "--offsets", "0", "--continuation", "4",
                    "--methods", "full", "knorm", "knorm:head_budget=uniform", "--out", str(tmp_path / "ppl")])
    assert requests[-1] == ("ppl", [{"name": "knorm", "compression_ratio": 0.5, "ours": "knorm@0.5"}])  # kwargs: no twin
    row = {r["method"]: r for r in out["summary"]}["knorm@0.5"]
    assert row["kvpress_ppl"] == pytest.approx(10.0)
    assert row["ours/kvpress"] == pytest.approx(row["ppl"] / 10.0)
    out = needle.main([*args, "--lengths", "150", "--depths", "0.5", "--methods", "snapkv", "--max-new-tokens", "2",
                       "--out", str(tmp_path / "needle")])
    row = out["summary"][0]
    assert row["kvpress_found"] == 1 and row["ours/kvpress"] == row["accuracy"]


def test_speed_end_to_end(tmp_path):
    speed.main([*COMMON, "--lengths", "128", "512", "--repeats", "2", "--steps", "3", "--methods", "full", "knorm",
                "--out", str(tmp_path)])
    rows, data = read_outputs(tmp_path, "speed")
    assert len(rows) == 4
    summary = {(r["method"], r["length"]): r for r in data["summary"]}
    for r in data["summary"]:
        assert r["prefill_s"] > 0 and r["decode_ms"] > 0 and r["peak_mib"] is not None and r["peak_mib"] >= 0
    assert summary[("full", 128)]["compress_ms"] == 0  # DynamicCache never compresses
    assert summary[("knorm@0.5", 512)]["compress_ms"] > 0
    assert summary[("full", 512)]["kv_mib"] == pytest.approx(4 * summary[("full", 128)]["kv_mib"])
    assert summary[("knorm@0.5", 512)]["kv_mib"] == pytest.approx(summary[("full", 512)]["kv_mib"] * 0.5 * 260 / 256, rel=0.01)


def test_micro_end_to_end(tmp_path):
    micro.main(["--tiny", "--threads", "1", "--quiet", "--out", str(tmp_path)])
    rows, data = read_outputs(tmp_path, "micro")
    kernels = {(r["kernel"], r["impl"]) for r in data["rows"]}
    for name in ("score knorm", "gather 50%", "quantize 4b G32", "dequantize 2b G32", "rope shift, per token"):
        assert (name, "ours") in kernels
    for r in data["rows"]:
        assert r["fraction_of_copy"] == pytest.approx(r["clone_ms"] / r["ms"])
        if r["impl"] == "torch":
            ours = next(o for o in data["rows"] if o["kernel"] == r["kernel"] and o["impl"] == "ours")
            assert r["ours/theirs"] == pytest.approx(ours["ms"] / r["ms"])


def test_report_fills_the_readme_section(tmp_path):
    micro.main(["--tiny", "--threads", "1", "--quiet", "--out", str(tmp_path / "results")])
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n<!-- bench-results:begin -->\nold\n<!-- bench-results:end -->\n\n## After\n")
    report.main([str(tmp_path / "results"), "--readme", str(readme)])
    text = readme.read_text()
    assert "old" not in text and text.endswith("## After\n")
    assert "python -m kvpress_rs.bench micro --tiny" in text and "](results/micro.png)" in text
    assert "| score knorm | ours |" in text


def test_specs():
    assert parse_spec("snapkv:window_size=32,kernel_size=1.5,head_budget=adakv,rerotate=true") == (
        "snapkv", {"window_size": 32, "kernel_size": 1.5, "head_budget": "adakv", "rerotate": True})
    assert expand(["full", "tova"], [0.25, 0.5]) == [Method("full", "full"), Method("tova", "tova", {}, 0.25),
                                                    Method("tova", "tova", {}, 0.5)]
    with pytest.raises(InvalidArgumentError, match="`methods`.*'nosuch'"):
        expand(["nosuch"], [0.5])
    with pytest.raises(ValueError, match="key=value"):
        parse_spec("snapkv:window_size")


def test_console_script_points_at_the_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["kvpress-rs-bench"].partition(":")
    import importlib

    main = getattr(importlib.import_module(module), attr)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0


def test_a_press_kvpress_cannot_run_is_said_and_left_out(tmp_path, monkeypatch, capsys):
    """kvpress's PyramidKV cannot decode a multi-token question after compression under
    transformers 5.2 (layers of different lengths, one mask): its side reports the error per
    press, the others' answers are kept, and the summary shows no kvpress figure for it."""
    from kvpress_rs.bench import kvpress_env

    def fake_run(request):
        ids = [7]
        return {"results": [{"press": p, "task": t["name"], "answer_ids": ids, "kv_bytes": 1}
                            for p in request["presses"] if p["name"] != "pyramidkv" for t in request["tasks"]],
                "errors": [{"press": p, "error": "RuntimeError: sizes"} for p in request["presses"] if p["name"] == "pyramidkv"]}

    monkeypatch.setattr(kvpress_env, "kvpress_python", lambda: "python")
    monkeypatch.setattr(kvpress_env, "run_kvpress", fake_run)
    out = needle.main(["--tiny", "--threads", "1", "--quiet", "--ratios", "0.5", "--lengths", "150", "--depths", "0.5",
                       "--methods", "pyramidkv", "knorm", "--max-new-tokens", "2", "--out", str(tmp_path)])
    summary = {r["method"]: r for r in out["summary"]}
    assert summary["knorm@0.5"]["kvpress_found"] == 0
    assert summary["pyramidkv@0.5"].get("kvpress_found") in (None, "-")
    assert "kvpress pyramidkv@0.5 failed: RuntimeError: sizes" in capsys.readouterr().out
    data = json.loads((tmp_path / "needle.json").read_text())
    assert data["meta"]["kvpress_errors"][0]["press"]["name"] == "pyramidkv"


def test_block_prefill_memory_run_on_an_architecture_with_random_weights():
    """``bench decoding memory --config``: the same measurement from a config alone. The
    block-wise prefill's cache never holds more than budget + one block, the full prefill's
    holds every token, and the attention hook is restored afterwards."""
    from kvpress_rs.bench.decoding import memory_one
    from kvpress_rs.cache import CompressedLayer
    from kvpress_rs.models import tiny_dir

    attend = CompressedLayer.attend
    config = str(tiny_dir() / "config.json")
    full = memory_one(256, "full", 32, 32, config)
    block = memory_one(256, "block", 32, 32, config)
    assert CompressedLayer.attend is attend
    assert full["weights"].startswith("random")
    assert block["peak_cache_bytes"] < full["peak_cache_bytes"]
    assert full["peak_above_loaded_mib"] is not None and full["peak_above_loaded_mib"] >= 0
    # bytes are proportional to tokens held: 256 for the full prefill, at most 32 + 32 after blocks
    assert 0 < block["cache_bytes_after"] <= full["cache_bytes_after"] * 64 / 256


def test_quant_frontier_needle_runs_every_passcode_at_every_depth(monkeypatch):
    from kvpress_rs import data
    from kvpress_rs.bench import quant
    from kvpress_rs.models import load_model

    model, tokenizer = load_model("tiny", dtype="float32")
    asked: list[tuple[str, float, str]] = []
    real_prompt = data.needle_prompt

    def recording_prompt(tokenizer, context_tokens, depth, passcode, answer_prefix):
        asked.append((passcode, depth, answer_prefix))
        return real_prompt(tokenizer, context_tokens=context_tokens, depth=depth, passcode=passcode,
                           answer_prefix=answer_prefix)

    monkeypatch.setattr(data, "needle_prompt", recording_prompt)
    found = quant.needle(model, tokenizer, quant.cache_factory(model, "fp"), 120, [0.2, 0.8], True,
                         passcodes=("1111111", "2222222"), answer_prefix=data.ANSWER_PREFIX)
    p = data.ANSWER_PREFIX
    assert asked == [("1111111", 0.2, p), ("1111111", 0.8, p), ("2222222", 0.2, p), ("2222222", 0.8, p)]
    assert set(found) == {"1111111", "2222222"} and all(0 <= n <= 2 for n in found.values())
