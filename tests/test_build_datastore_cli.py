"""trainers.build_datastore: the command-line tool that turns caption files into a datastore directory."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from engine.datastore import CaptionDatastore
from trainers import build_datastore


def run(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = build_datastore.main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else None), err


def test_help_explains_inputs(capsys):
    with pytest.raises(SystemExit) as done:
        build_datastore.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("--out", "--append", "--clap", "--csv-column", "DRCap layout", "one caption per line"):
        assert phrase in text


def test_build_then_append(tmp_path, tiny_clap, tiny_clap_dir, capsys):
    pd.DataFrame({"caption": ["A dog barks", "Rain falls", "A dog barks"]}).to_csv(tmp_path / "a.csv", index=False)
    (tmp_path / "b.jsonl").write_text('{"target": "Wind blows"}\n{"target": "Rain falls"}\n')
    (tmp_path / "c.txt").write_text("Thunder rumbles\n")
    out = tmp_path / "store"
    common = ["--profile", "tiny", "--clap", str(tiny_clap_dir), "--device", "cpu", "--quiet", "--out", str(out)]
    code, summary, _ = run(capsys, *common, str(tmp_path / "a.csv"), str(tmp_path / "b.jsonl"))
    assert code == 0 and summary["captions"] == 3 and summary["added"] == 3 and summary["clap_untrained"] is True
    store = CaptionDatastore.load(out, tiny_clap)
    assert store.captions == ["A dog barks", "Rain falls", "Wind blows"]
    assert store.caption_sources == ["a.csv", "a.csv", "b.jsonl"]

    with pytest.raises(SystemExit, match="already holds a datastore; pass --append"):
        build_datastore.main([*common, str(tmp_path / "c.txt")])
    code, summary, _ = run(capsys, *common, "--append", str(tmp_path / "c.txt"), str(tmp_path / "a.csv"))
    assert code == 0 and summary == {**summary, "captions": 4, "added": 1}
    assert CaptionDatastore.load(out, tiny_clap).captions[-1] == "Thunder rumbles"


def test_errors_are_reported_with_exit_code_2(tmp_path, tiny_clap_dir, capsys):
    pd.DataFrame({"text": ["x"]}).to_csv(tmp_path / "a.csv", index=False)
    common = ["--profile", "tiny", "--clap", str(tiny_clap_dir), "--device", "cpu", "--quiet", "--out",
              str(tmp_path / "s")]
    code, _, err = run(capsys, *common, str(tmp_path / "a.csv"))
    assert code == 2 and "no 'caption' column" in err
    code, summary, _ = run(capsys, *common, "--csv-column", "text", str(tmp_path / "a.csv"))
    assert code == 0 and summary["captions"] == 1
    code, _, err = run(capsys, "--profile", "tiny", "--clap", str(tmp_path / "no-model"), "--out",
                       str(tmp_path / "t"), str(tmp_path / "a.csv"))
    assert code == 2 and "Could not load a CLAP model" in err
