"""The demo-bundle build pipeline end to end at CI size: corpus (procedural sources only) -> demo CLAP -> stores ->
DRCap decoder, then the bundle loads as a profile would load it and describes a clip."""
from __future__ import annotations

import json

import pytest

from engine.datastore import CaptionDatastore, current_files
from engine.service import AudioScribe
from trainers.build_demo_bundle import BundleConfig, build, bundle_config, main


@pytest.fixture(scope="module")
def smoke_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    summary = build(BundleConfig(smoke=True, work=str(root / "work"), out=str(root / "out")))
    return root, summary


def test_smoke_build_writes_every_part(smoke_bundle):
    root, summary = smoke_bundle
    out = root / "out"
    assert set(summary["timings_s"]) == {"corpus", "clap", "stores", "decoder", "examples"}
    assert (out / "clap" / "demo_clap.json").is_file() and (out / "clap" / "model.safetensors").is_file()
    clap_config = json.loads((out / "clap" / "demo_clap.json").read_text())
    assert clap_config["trained"] is True and len(clap_config["classes"]) >= 4
    assert (out / "decoder" / "drcap_config.json").is_file() and (out / "decoder" / "llm" / "config.json").is_file()
    for style in ("style_a", "style_b"):
        assert (out / "stores" / style / "manifest.json").is_file()
        assert not (current_files(out / "stores" / style) / "index.faiss").exists()  # compact: rebuilt on load
    heldout = (out / "heldout" / "heldout.jsonl").read_text().splitlines()
    assert heldout and all((out / "heldout" / json.loads(line)["path"]).is_file() for line in heldout)
    examples = [json.loads(line) for line in (out / "examples" / "examples.jsonl").read_text().splitlines()]
    readme = (out / "examples" / "README.md").read_text()
    assert examples and all(e["path"] in readme and (out / "examples" / e["path"]).is_file() for e in examples)
    assert len({e["labels"][0] for e in examples}) == len(examples)  # one clip per class
    info = json.loads((out / "bundle.json").read_text())
    assert info["config"]["smoke"] is True and info["timings_s"] == summary["timings_s"]


def test_smoke_bundle_loads_and_describes_a_held_out_clip(smoke_bundle):
    root, _ = smoke_bundle
    out = root / "out"
    config = bundle_config(out, root / "cache")
    config.caption.num_beams, config.caption.max_new_tokens = 1, 6
    scribe = AudioScribe.from_config(config, show_progress=False)
    assert not scribe.clap.is_untrained and scribe.captioner.trained and not scribe.captioner.is_untrained
    assert scribe.clap.known_classes and "sound classes" in scribe.clap.about
    manifest = [json.loads(line) for line in (root / "work" / "soundworld" / "manifest.jsonl").read_text().splitlines()]
    clip = next(r for r in manifest if r["split"] == "test")
    result = scribe.caption(scribe.load(root / "work" / "soundworld" / clip["path"]))
    assert isinstance(result.clip.caption, str) and len(result.clip.retrieved) == config.caption.rag_k
    store = CaptionDatastore.load(out / "stores" / "style_a", scribe.clap)
    assert all(caption in store.captions for caption, _ in result.clip.retrieved)


def test_unknown_step_is_a_clear_error(tmp_path, capsys):
    code = main(["--smoke", "true", "--work", str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "corpus,fly"])
    assert code == 2 and "Unknown build steps ['fly']" in capsys.readouterr().err
