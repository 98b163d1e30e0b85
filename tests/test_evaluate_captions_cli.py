"""trainers.evaluate_captions: the command-line tool that scores predicted captions against reference files."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from engine import metrics
from engine.metrics import evaluate_captions
from trainers import evaluate_captions as cli

AUDIOCAPS_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "audiocaps" / "test.csv"
AUDIOCAPS_COLUMNS = ["audiocap_id", "youtube_id", "start_time", "caption"]
OFFLINE = "bleu,rouge_l,cider_d,vocab"


@pytest.fixture(autouse=True)
def no_jars(monkeypatch):
    monkeypatch.delenv(metrics.JARS_ENV, raising=False)


def audiocaps_rows(clips: int = 3) -> list[dict]:
    """The first clips of the real AudioCaps test.csv (5 rows each), or rows in its layout when it is absent."""
    if AUDIOCAPS_TEST.is_file():
        with AUDIOCAPS_TEST.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        ids = list(dict.fromkeys(row["youtube_id"] for row in rows))[:clips]
        return [row for row in rows if row["youtube_id"] in ids]
    texts = ["A dog barks", "Rain falls on a roof", "A man speaks while birds chirp"]
    return [{"audiocap_id": str(100 * c + i), "youtube_id": f"clip{c}", "start_time": "30",
             "caption": f"{texts[c]} {'loudly ' * i}".strip()} for c in range(clips) for i in range(5)]


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def audiocaps(tmp_path) -> tuple[Path, list[str], list[list[str]]]:
    """An AudioCaps-layout references CSV; returns it with the clip ids and their grouped captions."""
    rows = audiocaps_rows()
    path = write_csv(tmp_path / "test.csv", rows, AUDIOCAPS_COLUMNS)
    ids = list(dict.fromkeys(row["youtube_id"] for row in rows))
    groups = [[row["caption"] for row in rows if row["youtube_id"] == clip] for clip in ids]
    assert all(len(group) == 5 for group in groups)
    return path, ids, groups


def test_help(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("--references", "--out", "--metrics", "--key-column", "--allow-missing", "AudioCaps layout"):
        assert phrase in text


def test_audiocaps_csv_references_match_the_library(tmp_path, audiocaps, capsys):
    refs_path, ids, groups = audiocaps
    captions = ["a dog is barking", groups[1][0], "something happens"]
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"key": k, "caption": c} for k, c in zip(ids, captions)])
    out = tmp_path / "report" / "metrics.json"
    code, table, _ = run(capsys, preds, "--references", refs_path, "--out", out)
    assert code == 0
    report = json.loads(out.read_text())
    expected = evaluate_captions(captions, groups)
    assert report["scores"] == pytest.approx(expected)
    assert set(report["scores"]) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d", "vocab"}
    assert set(report["unavailable"]) == {"meteor", "spice", "spider"}
    assert metrics.JARS_ENV in report["unavailable"]["meteor"]
    assert report["counts"] == {"evaluated": 3, "references_evaluated": 15, "predictions": 3, "reference_keys": 3,
                                "predictions_without_references": 0, "references_without_prediction": 0}
    assert report["normalisation"] == metrics.NORMALISATION
    assert list(report["per_item"]) == ids and set(report["per_item"][ids[0]]) == {"rouge_l", "cider_d"}
    assert report["per_item"][ids[1]]["rouge_l"] == pytest.approx(1.0)
    for name in ("cider_d", "bleu_4", "vocab"):
        assert any(line.split()[0] == name for line in table.splitlines())
    assert "unavailable: " in table and "(3 items, 15 references)" in table


def test_jsonl_references_csv_predictions_and_metric_choice(tmp_path, capsys):
    preds = write_csv(tmp_path / "preds.csv", [{"key": "a", "caption": "A dog barks."},
                                               {"key": "b", "caption": "Rain falls"}], ["key", "caption"])
    lists = write_jsonl(tmp_path / "refs.jsonl", [{"key": "b", "references": ["rain is falling", "rain falls"]},
                                                 {"key": "a", "references": ["a dog barks", "a dog is barking"]}])
    # DRCap layout: one 'target' per line, lines of the same key grouped
    targets = write_jsonl(tmp_path / "targets.jsonl", [{"key": "a", "target": "a dog barks"},
                                                      {"key": "b", "target": "rain is falling"},
                                                      {"key": "a", "target": "a dog is barking"},
                                                      {"key": "b", "target": "rain falls"}])
    expected = evaluate_captions(["A dog barks.", "Rain falls"],
                                 [["a dog barks", "a dog is barking"], ["rain is falling", "rain falls"]],
                                 ["bleu", "cider_d"])
    for refs in (lists, targets):
        out = tmp_path / f"{refs.stem}.json"
        code, _, _ = run(capsys, preds, "--references", refs, "--out", out, "--metrics", "bleu, cider-d")
        report = json.loads(out.read_text())
        assert code == 0 and report["scores"] == pytest.approx(expected) and report["unavailable"] == {}
        assert report["metrics"] == ["bleu", "cider_d"]


def test_inline_references_and_key_column(tmp_path, capsys):
    preds = write_jsonl(tmp_path / "preds.jsonl", [
        {"file": "x.wav", "caption": "a dog barks", "references": ["a dog barks", "dog barking"]},
        {"file": "y.wav", "caption": "wind", "references": ["wind blows"]}])
    code, _, err = run(capsys, preds, "--metrics", "rouge_l")
    assert code == 2 and "no key column" in err and "--key-column" in err
    out = tmp_path / "m.json"
    code, _, _ = run(capsys, preds, "--key-column", "file", "--metrics", "rouge_l,vocab", "--out", out)
    report = json.loads(out.read_text())
    assert code == 0 and report["references_file"].startswith("inline")
    assert report["scores"] == pytest.approx(evaluate_captions(
        ["a dog barks", "wind"], [["a dog barks", "dog barking"], ["wind blows"]], ["rouge_l", "vocab"]))
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"key": "x", "caption": "a dog"}])
    code, _, err = run(capsys, plain)
    assert code == 2 and "give the references with --references" in err


def test_missing_keys_fail_unless_allowed(tmp_path, audiocaps, capsys):
    refs_path, ids, groups = audiocaps
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"key": ids[0], "caption": "a dog barks"},
                                                  {"key": ids[1], "caption": "rain falls"},
                                                  {"key": "not-a-clip", "caption": "wind blows"}])
    code, out, err = run(capsys, preds, "--references", refs_path)
    assert code == 2 and out == ""
    assert "1 predictions have no references (e.g. 'not-a-clip')" in err
    assert f"1 reference keys have no prediction (e.g. '{ids[2]}')" in err
    assert "--allow-missing" in err

    report_path = tmp_path / "m.json"
    code, _, _ = run(capsys, preds, "--references", refs_path, "--allow-missing", "--out", report_path)
    report = json.loads(report_path.read_text())
    assert code == 0
    assert report["counts"]["evaluated"] == 2 and report["counts"]["predictions_without_references"] == 1
    assert report["missing"] == {"predictions_without_references": ["not-a-clip"],
                                 "references_without_prediction": [ids[2]]}
    assert report["scores"] == pytest.approx(evaluate_captions(["a dog barks", "rain falls"], groups[:2]))

    elsewhere = write_jsonl(tmp_path / "other.jsonl", [{"key": "q", "caption": "x"}])
    code, _, err = run(capsys, elsewhere, "--references", refs_path, "--allow-missing")
    assert code == 2 and "no key matches" in err


def test_input_errors_exit_2(tmp_path, audiocaps, capsys):
    refs_path, ids, _ = audiocaps
    one = write_jsonl(tmp_path / "one.jsonl", [{"key": ids[0], "caption": "a dog barks"}])
    code, _, err = run(capsys, one, "--references", refs_path, "--allow-missing")
    assert code == 2 and "at least 2 candidates" in err
    code, _, _ = run(capsys, one, "--references", refs_path, "--allow-missing", "--metrics", "bleu")
    assert code == 0
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"key": ids[0], "caption": "a"}, {"key": ids[0], "caption": "b"}])
    code, _, err = run(capsys, dup, "--references", refs_path)
    assert code == 2 and "two predictions" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "a", "caption": "x"}\nnot json\n')
    code, _, err = run(capsys, bad, "--references", refs_path)
    assert code == 2 and "bad.jsonl:2: not valid JSON" in err
    code, _, err = run(capsys, tmp_path / "absent.jsonl", "--references", refs_path)
    assert code == 2 and "does not exist" in err
    with pytest.raises(SystemExit) as done:
        cli.main([str(one), "--metrics", "bleu,cider"])
    assert done.value.code == 2 and "unknown metric(s) cider" in capsys.readouterr().err


def test_clotho_csv_references(tmp_path, capsys):
    columns = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]
    rows = [{"file_name": "a.wav", **{f"caption_{i}": f"a dog barks {'loudly ' * i}".strip() for i in range(1, 6)}},
            {"file_name": "b.wav", **{f"caption_{i}": f"rain falls {'hard ' * i}".strip() for i in range(1, 6)}}]
    refs = write_csv(tmp_path / "clotho.csv", rows, columns)
    preds = write_csv(tmp_path / "preds.csv", [{"file_name": "a.wav", "caption": "a dog barks"},
                                               {"file_name": "b.wav", "caption": "rain"}], ["file_name", "caption"])
    out = tmp_path / "m.json"
    code, _, _ = run(capsys, preds, "--references", refs, "--metrics", OFFLINE, "--out", out)
    report = json.loads(out.read_text())
    assert code == 0 and report["counts"]["references_evaluated"] == 10
    assert report["scores"] == pytest.approx(evaluate_captions(
        ["a dog barks", "rain"], [[row[c] for c in columns[1:]] for row in rows], OFFLINE.split(",")))
