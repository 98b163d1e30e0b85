"""Annotate three clips with the keyboard only, reload, resume, export, and check what the exported CSV holds
(issue 9, Tests). The app runs on this machine, so a server folder in tmp_path works (annotate.server_paths is on
by default)."""
from __future__ import annotations

import io
import re
import shutil
import uuid
from pathlib import Path

import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # the fixtures (conftest.py) skip these tests, or fail them in CI, saying why
    expect = None

from tests.browser import pages

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"
CLIPS = ["siren-test_008666.flac", "piano-test_008875.flac", "knocking-test_008608.flac",
         "trumpet-test_008689.flac"]
SUGGEST_TIMEOUT_MS = 90_000  # suggestions (caption + labels) take a few s here; generous for a cold CI machine
EDITED = "a test caption typed by hand in the browser"


def clip_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "clips"
    folder.mkdir()
    for i, name in enumerate(CLIPS):
        shutil.copy(EXAMPLES / name, folder / f"{i + 1:02d}-{name}")
    return folder


def open_queue(page, queue: str, annotator: str, folder: Path | None = None) -> None:
    """The Queue accordion (mouse and typing allowed: this is set-up, not annotation)."""
    pages.open_tab(page, "Annotate")
    pages.text_field(page, pages.ANNOTATE_QUEUE).fill(queue)
    if folder is not None:
        pages.text_field(page, pages.ANNOTATE_PATH).fill(str(folder))
    pages.text_field(page, pages.ANNOTATE_ANNOTATOR).fill(annotator)
    pages.by_id(page, pages.ANNOTATE_OPEN).click()


def wait_for_clip(page, number: int, total: int) -> None:
    """Clip ``number`` is shown and its suggestions have arrived (they fill the empty caption box)."""
    expect(pages.by_id(page, pages.ANNOTATE_CLIP)).to_contain_text(f"clip {number} of {total}", timeout=30_000)
    expect(pages.by_id(page, pages.ANNOTATE_SUGGESTIONS)).to_contain_text("Generated caption",
                                                                         timeout=SUGGEST_TIMEOUT_MS)
    expect(pages.text_field(page, pages.ANNOTATE_CAPTION)).to_have_value(re.compile(r"\w{3,}"),
                                                                         timeout=SUGGEST_TIMEOUT_MS)
    page.wait_for_timeout(300)  # the suggestion event's other outputs (labels) land in the same update


def test_annotate_with_keyboard_reload_resume_and_export(page, tmp_path, screenshot, tab_screenshot):
    run = uuid.uuid4().hex[:8]
    queue, annotator = f"browser-{run}", f"tester-{run}"
    open_queue(page, queue, annotator, clip_folder(tmp_path))
    expect(pages.by_id(page, "annotate-queue-note")).to_contain_text("4 clips", timeout=30_000)
    wait_for_clip(page, 1, 4)
    page.locator("body").click(position={"x": 5, "y": 5})  # focus off the button: keys go to the page

    # Clip 1: accept the suggestion.
    page.keyboard.press("a")
    wait_for_clip(page, 2, 4)
    # Clip 2: E focuses the caption, type over it, Ctrl+Enter accepts (an edited caption: status "edit").
    page.keyboard.press("e")
    caption = pages.text_field(page, pages.ANNOTATE_CAPTION)
    expect(caption).to_be_focused()
    page.keyboard.press("Control+a")
    page.keyboard.type(EDITED)
    page.keyboard.press("Control+Enter")
    page.keyboard.press("Escape")  # leave the caption box so the next keys are shortcuts again
    wait_for_clip(page, 3, 4)
    # Clip 3: 1 toggles the first label, A accepts.
    first_label = pages.annotate_labels(page).first
    was_checked = first_label.is_checked()
    page.keyboard.press("1")
    expect(first_label).to_be_checked(checked=not was_checked)
    page.keyboard.press("a")
    expect(pages.by_id(page, pages.ANNOTATE_CLIP)).to_contain_text("clip 4 of 4", timeout=30_000)
    progress = pages.by_id(page, pages.ANNOTATE_PROGRESS)
    expect(progress).to_contain_text("3 of 4 decided", timeout=30_000)
    expect(progress).to_contain_text("2 accepted")
    expect(progress).to_contain_text("1 edited")
    screenshot("three-decided")

    # Reload: the same queue and annotator resume at the first undecided clip.
    page.reload()
    expect(pages.tab(page, "Annotate")).to_be_visible(timeout=60_000)
    open_queue(page, queue, annotator)
    wait_for_clip(page, 4, 4)
    expect(pages.by_id(page, pages.ANNOTATE_PROGRESS)).to_contain_text("3 of 4 decided")
    # Clip 4: skip it (S), so the export below shows that skipped clips stay out by default.
    page.locator("body").click(position={"x": 5, "y": 5})
    page.keyboard.press("s")
    expect(pages.by_id(page, pages.ANNOTATE_PROGRESS)).to_contain_text("4 of 4 decided", timeout=30_000)
    expect(pages.by_id(page, pages.ANNOTATE_PROGRESS)).to_contain_text("1 skipped")
    expect(pages.by_id(page, pages.ANNOTATE_CLIP)).to_contain_text("All clips are decided")
    # Previous (P) from the end shows the last clip, again the one before: clip 3 with its suggestions and the
    # decision made on it, for the README's screenshot.
    page.keyboard.press("p")
    wait_for_clip(page, 4, 4)
    page.keyboard.press("ArrowLeft")
    wait_for_clip(page, 3, 4)
    expect(pages.by_id(page, pages.ANNOTATE_CLIP)).to_contain_text("your last decision: accept")
    tab_screenshot("annotate")

    # Export the queue (default: accepted and edited decisions; csv + audiofolder) and read the CSV back.
    pages.open_tab(page, "Export")
    pages.by_id(page, pages.EXPORT_REFRESH).click()
    queue_box = pages.text_field(page, pages.EXPORT_QUEUE)
    queue_box.fill(queue)
    queue_box.press("Enter")
    page.wait_for_timeout(300)
    pages.by_id(page, pages.EXPORT_BUTTON).click()
    links = pages.export_links(page)
    expect(links.first).to_be_visible(timeout=60_000)
    summary = pages.by_id(page, pages.EXPORT_SUMMARY)
    expect(summary.get_by_role("row", name=re.compile(r"^csv 3 annotations\.csv"))).to_be_visible(timeout=30_000)
    tab_screenshot("export")
    hrefs = links.evaluate_all("links => links.map(a => a.href)")
    csv_links = [h for h in hrefs if h.split("?")[0].endswith(".csv")]
    assert csv_links, f"no CSV among the exported files: {hrefs}"
    assert any(h.split("?")[0].endswith(".zip") for h in hrefs), f"no zipped audiofolder: {hrefs}"
    response = page.request.get(csv_links[0])
    assert response.ok, f"{csv_links[0]}: HTTP {response.status}"

    import pandas as pd
    table = pd.read_csv(io.BytesIO(response.body()))
    assert len(table) == 3, f"3 accepted/edited decisions, skip excluded; got {len(table)} rows:\n{table}"
    assert sorted(table["status"]) == ["accept", "accept", "edit"], table["status"].tolist()
    assert set(table["annotator"]) == {annotator}
    edited = table[table["status"] == "edit"]
    assert edited["caption"].tolist() == [EDITED], edited["caption"].tolist()
    assert edited["file_name"].str.startswith("02-").all(), edited["file_name"].tolist()
    accepted = table[table["status"] == "accept"]
    assert (accepted["caption"] == accepted["suggested_caption"]).all(), accepted[["caption", "suggested_caption"]]
    assert "04-" not in " ".join(table["file_name"]), "the skipped clip was exported"
    third = table[table["file_name"].str.startswith("03-")].iloc[0]
    label_sets = [set(str(v).split(";")) - {"", "nan"} for v in (third["labels"], third["suggested_labels"])]
    assert label_sets[0] != label_sets[1], f"key 1 should have toggled a label on clip 3: {third.to_dict()}"
