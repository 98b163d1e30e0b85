"""benchmarks/bench_gpu.py runs unchanged on the CPU with tiny models: every stage is measured, the fast decoding
path gives plain generate's tokens, and its section lands in the results file (the GPU run uses the same code)."""
from __future__ import annotations

import json

from benchmarks import bench_gpu


def test_bench_gpu_runs_on_tiny_models(tmp_path):
    out, raw = tmp_path / "RESULTS.md", tmp_path / "raw.json"
    out.write_text("# Results\n\n## Other (kept)\n\nother text\n")
    code = bench_gpu.main(["--tiny", "--device", "cpu", "--llm", "none/fp32", "--beams", "1,4", "--new-tokens", "5",
                           "--repeats", "2", "--batch", "4", "--store-size", "3000", "--tuning-classes", "3",
                           "--tuning-presets", "quick", "--tuning-captions", "3000",
                           "--out", str(out), "--json", str(raw)])
    assert code == 0
    text = out.read_text()
    assert "## Other (kept)\n\nother text" in text and bench_gpu.SECTION_TITLE in text
    res = json.loads(raw.read_text())
    profile = res["profiles"]["none/fp32"]
    for beams in ("beams=1", "beams=4"):
        stages = profile[beams]
        assert stages["identical tokens"] is True
        for path in ("plain generate", "fast path"):
            assert stages[path]["tokens"] == 5 and stages[path]["tokens_per_s"] > 0
        assert all(stages[k] > 0 for k in ("retrieval", "projection", "prefill", "end to end"))
    assert set(res["clap_stages"]) == {"decode audio", "features", "audio tower"}
    assert res["batch"]["batch"] == 4 and res["batch"]["clips_per_s"] > 0
    assert [(r["classes"], r["preset"]) for r in res["tuning"]] == [(3, "quick")] and res["tuning"][0]["texts"] > 0
    assert "| fast path tokens identical to plain generate | yes |" in text
    assert "Tiny models: these rows check that the script runs" in text
