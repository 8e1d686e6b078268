"""report.html as a person would look at it: every image it shows exists and decodes, file names with quotes,
markup and invalid UTF-8 are shown as text, it stays under 1 MB, and headless Chromium renders it (not blank)."""
from __future__ import annotations

import csv
import html
import os
import re
import shutil
import subprocess
import urllib.parse
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from batch_job import heatmaps, html_report, report
from batch_job.cli import main
from batch_job.shard_result import Flagged
from batch_job.synthetic import make_tree
from batch_job.worklist import Entry, WorklistSummary
from helpers import parse, read_predictions, reconciliation, run_result, textured, write_bad_inputs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MARKUP = "<img src=x onerror=alert(1)>"
HOSTILE = ['quote"d \'name\'.png', f"{MARKUP}.png", "a&amp;b.png"]
BAD_UTF8 = b"caf\xe9 \xff.png"  # Latin-1 bytes: not UTF-8


def read_heatmap_index(out_dir: str) -> list[dict]:
    """heatmaps/index.csv's rows, in file order (rank 1 first)."""
    with open(os.path.join(out_dir, heatmaps.FOLDER, heatmaps.INDEX_FILE), newline="", encoding="utf-8",
              errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == heatmaps.INDEX_COLUMNS == ("rank", "path", "probability", "label",
                                                                       "heatmap")
        rows = list(reader)
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    return rows


@pytest.fixture(scope="module")
def report_run(heat_package, tmp_path_factory) -> str:
    """Labelled synthetic images, every bad-input kind (one with markup in its name), bright flagged images
    named with quotes, markup, an entity and invalid UTF-8."""
    root = tmp_path_factory.mktemp("report_xrays")
    make_tree(str(root / "site"), per_class=12, size=96, seed=7)
    odd = root / "site" / "PNEUMONIA" / "odd"
    odd.mkdir()
    for i, name in enumerate(HOSTILE):
        textured((160, 120), 200 + 10 * i).save(odd / name)
    textured((160, 120), 230).save(os.path.join(os.fsencode(str(odd)), BAD_UTF8), format="PNG")
    write_bad_inputs(str(root / "site" / "bad"))
    (root / "site" / "bad" / f'{MARKUP}"broken.jpeg').write_bytes(b"")
    out = str(tmp_path_factory.mktemp("report_run") / "out")
    assert main(["--input", str(root / "site"), "--model", heat_package, "--output", out, "--shard-size", "10",
                 "--heatmaps", "8", "--threshold", "0.58", "--direct_running_mode=in_memory"]) == 0
    return out


def test_every_image_the_page_shows_exists_and_decodes(report_run):
    page, _ = parse(os.path.join(report_run, "report.html"))
    srcs = [a["src"] for tag, a in page.tags if tag == "img"]
    links = [a["href"] for tag, a in page.tags if tag == "a"]
    assert not [tag for tag, _ in page.tags if tag in ("script", "link", "iframe", "object")]
    originals = set(read_predictions(report_run))
    inside = [ref for ref in srcs + links if not ref.startswith("..")]
    for ref in srcs + links:  # relative links: nothing from the network, nothing but OUT_DIR and the originals
        assert "://" not in ref and not ref.startswith("/"), ref
        if ref.startswith(".."):  # a flagged image's original, on its tile or in the table (its name percent-encoded)
            original = os.fsdecode(urllib.parse.unquote_to_bytes(ref))
            assert os.path.normpath(os.path.join(report_run, original)) in originals, ref
        elif ref.endswith(".png"):
            with Image.open(os.path.join(report_run, ref)) as img:
                img.load()
                assert img.width > 50 and img.height > 50
    heat = sorted(r["heatmap"] for r in read_heatmap_index(report_run) if r["heatmap"])
    assert len(heat) == 8
    assert sorted(srcs) == sorted(["histogram.png", "confusion.png", "roc.png"] + heat)
    anchors = {ref for ref in inside if ref.startswith("#")}  # the contents line's, each to a part of this page
    assert anchors == {"#worklist", "#out-of-scope", "#summary", "#drift", "#labels", "#errors"}
    assert anchors <= {f"#{a['id']}" for tag, a in page.tags if "id" in a}
    assert sorted(set(inside) - set(srcs) - anchors) == ["worklist.csv"]  # the tiles link their overlays
    flagged = sum(r["prediction"] == "PNEUMONIA" for r in read_predictions(report_run).values())
    # QA: the tiles, the most urgent reads, linked only their overlays, and out-of-scope and failed images nothing:
    # every flagged, out-of-scope and failed image the page names links its original now
    shown = flagged + sum(r["status"] in ("error", "out_of_scope") for r in read_predictions(report_run).values())
    assert len([ref for ref in links if ref.startswith("..")]) == shown
    assert len(set(ref for ref in links if ref.startswith(".."))) == shown
    raw = open(os.path.join(report_run, "report.html"), encoding="utf-8").read()
    assert "<th>overlay</th>" not in raw  # the table's rows are past the 8 overlays: no empty column (QA)
    name_style = re.search(r"\.tile \.name \{([^}]*)\}", raw).group(1)  # whole names: no ellipsis that made
    assert "text-overflow" not in name_style and "nowrap" not in name_style  # ..._001.jpeg and ..._002.jpeg alike
    assert os.path.getsize(os.path.join(report_run, "report.html")) < 1_000_000


def test_page_shows_the_run_and_odd_names_as_text(report_run):
    import json

    m = json.load(open(os.path.join(report_run, "metrics.json")))
    raw = open(os.path.join(report_run, "report.html"), encoding="utf-8").read()
    page, text = parse(os.path.join(report_run, "report.html"))
    assert MARKUP not in raw and html.escape(MARKUP) in raw  # escaped, never markup
    assert [a for tag, a in page.tags if tag == "img" and a.get("src") == "x"] == []
    for name in HOSTILE:
        assert name in text
    assert "caf\\xe9 \\xff.png" in text  # invalid UTF-8 shown as \xNN
    for card in (f"{m['images_found']} found", f"{m['images_scored']} scored", f"{m['images_failed']} failed",
                 f"{m['positive_count']} flagged PNEUMONIA", f"{m['positive_rate']:.1%} positive rate"):
        assert card in text, card
    assert f"Model {m['model']} · threshold {m['threshold']:.4f} · runner {m['runner']}" in text
    oos = m["images_out_of_scope"]
    unscreened = m["images_unscreened"]
    oos_words = f"{oos} (not screened: {unscreened}, each needs a read)" if unscreened else str(oos)
    drift = "DETECTED" if m["drift"]["detected"] else "none" if m["drift"]["judged"] else "not judged"
    assert (f"On this page: worklist, {m['positive_count']} flagged · out of scope, {oos_words} · counts · "
            f"drift: {drift} · "
            f"against folder labels · errors, {m['images_failed']}"
            in " ".join(text.split()))  # QA: 189 flagged rows put the out-of-scope section 4,000 px down
    rows = read_predictions(report_run)
    top = sorted((r for r in read_heatmap_index(report_run) if r["heatmap"]), key=lambda r: r["heatmap"])
    assert len(top) == 8 and [int(r["rank"]) for r in top] == list(range(1, 9))  # overlay names follow the rank
    for r in top:  # the index lists what the CSVs hold for each image
        assert rows[r["path"]]["probability"] == r["probability"] and rows[r["path"]]["label"] == r["label"]
        assert rows[r["path"]]["status"] == "ok" and rows[r["path"]]["prediction"] == "PNEUMONIA"
    probs = [float(r["probability"]) for r in top]
    assert probs == sorted(probs, reverse=True)  # the heatmaps' ranks: highest probability first
    positions = [text.index(f"#{i} P = {html_report.probability(p)}") for i, p in enumerate(probs, 1)]
    assert positions == sorted(positions)  # the tiles in that order
    errors = [r for r in rows.values() if r["status"] == "error"]
    assert f"Errors ({len(errors)})" in text and len(errors) == m["images_failed"] >= 6
    for r in errors:
        assert html_report.display(r["error"]) in text
    assert f'{MARKUP}"broken.jpeg' in text and "empty file (0 bytes)" in text


ODD_NAMES = [b"chest PA.jpeg", b"chest%20PA.jpeg", b"case#7.jpeg", b"what?.jpeg", b"\ttab.jpeg", b"new\nline.jpeg",
             b"M\xfcller.jpeg", b"100%.jpeg", b"a&b;c.jpeg"]


def test_a_link_to_an_original_opens_that_file_and_no_other(tmp_path):
    """"%20", "#", "?", whitespace and bytes that are not UTF-8 are part of a name, not a URL's escape, fragment or
    query: a browser resolving the link must reach the very file (chest%20PA.jpeg once opened chest PA.jpeg)."""
    out = str(tmp_path / "scores" / "night")
    folder = os.fsencode(str(tmp_path / "in" / "sub dir"))
    hrefs = []
    for name in ODD_NAMES:
        path = os.fsdecode(os.path.join(folder, name))
        href = html_report.file_link(path, out)
        assert re.fullmatch(r"[A-Za-z0-9_.~/%-]+", href), href  # nothing a browser reads as syntax or strips
        assert urllib.parse.unquote_to_bytes(href) == os.fsencode(os.path.relpath(path, out))
        hrefs.append(href)
    assert len(set(hrefs)) == len(ODD_NAMES)
    assert html_report.file_link("gs://bucket/x.png", out) == ""


def test_a_name_that_is_not_utf8_in_the_worklist_table_does_not_fail_the_page(tmp_path, monkeypatch):
    """A flagged image past the tiles, named in Latin-1, is a row of the table with a link: the page is written
    (it once failed the whole night with UnicodeEncodeError)."""
    from batch_job.worklist import Entry, WorklistSummary

    latin1 = os.fsdecode(os.fsencode(str(tmp_path)) + b"/M\xfcller.png")
    paths = [str(tmp_path / f"{i}.png") for i in range(3)] + [latin1]
    flagged = [Flagged(0.99 - 0.01 * i, p, "") for i, p in enumerate(paths)]
    listed = WorklistSummary(4, [(i + 1, Entry(p, "ok", f"{0.99 - 0.01 * i:.4f}", "PNEUMONIA"))
                                 for i, p in enumerate(paths)])
    result = replace(run_result(counts=reconciliation([0.99, 0.98, 0.97, 0.96]), flagged=flagged), worklist=listed)
    monkeypatch.setattr(html_report, "CAPS", (2, 500))  # two tiles
    html_report.write_html(str(tmp_path), result)
    page, text = parse(str(tmp_path / "report.html"))
    assert "M\\xfcller.png" in text
    links = [a["href"] for tag, a in page.tags if tag == "a" and a["href"].endswith(".png")]
    assert "M%FCller.png" in links and len(links) == 4  # the two tiles and the two rows past them


def test_the_page_says_what_the_model_was_trained_on_as_its_package_records_it(tmp_path, report_run):
    """The shipped set's population for a package trained on it; the user's words, escaped, for another; and for a
    package that does not record it (the test package of report_run), that it was not recorded: never the shipped
    models' population for weights trained on other images."""
    from xray_core.training_data import KERMANY_POPULATION, TrainingData

    _, text = parse(os.path.join(report_run, "report.html"))
    assert "Trained on images whose source was not recorded (train --data-source)" in text
    assert "Kermany" not in text
    for i, (source, shown) in enumerate([("kermany2018", f"Trained on {KERMANY_POPULATION}"),
                                         (f"adults {MARKUP} & co", f"Trained on adults {MARKUP} & co (as its")]):
        result = replace(run_result(), trained_on=TrainingData(source).population())
        os.makedirs(tmp_path / str(i))
        html_report.write_html(str(tmp_path / str(i)), result)
        raw = open(tmp_path / str(i) / "report.html", encoding="utf-8").read()
        assert shown in parse(str(tmp_path / str(i) / "report.html"))[1] and MARKUP not in raw
        assert f"Trained on {result.trained_on}" in report.report_markdown(result)  # QA: report.md never said


def test_page_stays_under_1_mb_with_many_long_error_rows(tmp_path):
    errors = [(i + 1, Entry(f"/data/{'very long folder name/' * 40}{i} <b>x</b>.png", "error", "", "",
                            "decode failed: " + "x" * 900, patient_id=f"P{i:07d}")) for i in range(500)]
    result = replace(run_result(counts=reconciliation(failed=3000), model="m/1", wall_seconds=1.0),
                     worklist=WorklistSummary(3000, errors=errors))  # the worklist keeps the first 500 (CAPS)
    assert result.metrics()["images_failed"] == 3000 and result.images_per_second == 3000
    size = html_report.write_html(str(tmp_path), result)
    assert size == os.path.getsize(tmp_path / "report.html") and 300_000 < size < 1_000_000
    _, text = parse(str(tmp_path / "report.html"))
    shown = text.count("decode failed: ")
    assert 100 <= shown <= 500 and f"{3000 - shown} more errors are at the end of worklist.csv" in text
    # QA: a truncated study was shown by its file name alone: each row has its worklist rank and patient
    assert "1 /data/very long" in text and f"patient P{shown - 1:07d}" in text and f"P{shown:07d}" not in text


def test_tiles_beyond_the_cap_point_at_the_heatmap_index(tmp_path):
    flagged = [Flagged(0.99 - 0.01 * i, f"/data/PNEUMONIA/{i}.png", "PNEUMONIA", png=f"heatmaps/{i + 1:04d}-x.png")
               for i in range(5)]
    result = run_result(counts=reconciliation([0.99, 0.98, 0.97, 0.96, 0.95, 0.1]), flagged=flagged, heatmaps=5,
                        model_has_heatmaps=True, map_hw=(8, 8))
    ctx = html_report.context(result, str(tmp_path), [], tiles_cap=2)
    assert [t["rank"] for t in ctx["tiles"]] == [1, 2] and ctx["tiles_left"] == 3
    page = html_report.render(ctx)
    text = " ".join(html.unescape(page).split())
    assert "3 more are listed in heatmaps/index.csv" in text.replace("<code>", "").replace("</code>", "")
    assert "heatmap</code> column" not in page
    assert "The 5 flagged images scored in this run with the highest probability (of 5 flagged)" in text
    assert "What a map can show: where in the image the model found its evidence, in 8×8 cells" in text
    assert "What it cannot: a lesion's outline, which finding it is" in text
    plain = [Flagged(f.probability, f.path, f.label) for f in flagged]  # a model without heatmaps: no index
    result = run_result(counts=reconciliation([0.99, 0.98, 0.97, 0.96, 0.95, 0.1]), flagged=plain, heatmaps=5,
                        model_has_heatmaps=False)
    text = " ".join(html.unescape(html_report.render(html_report.context(result, str(tmp_path), [], 2))).split())
    assert "3 more are PNEUMONIA rows of the predictions CSVs" in text and "index.csv" not in text


def screenshot(page: str, png: str, tmp: str) -> np.ndarray:
    """Headless Chromium's screenshot of `page` (1280x2400), with no network."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp}", "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1280,2400",
           f"--screenshot={png}", "file://" + page]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and os.path.exists(png), proc.stderr[-2000:]
    with Image.open(png) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def colourful(shot: np.ndarray) -> float:
    """Share of pixels with a clear colour (the figures and heatmaps; the page's own text and frames are gray)."""
    return float(np.mean(shot.max(axis=2) - shot.min(axis=2) > 60))


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium; .ci/run "
                                             "installs it): report.html was not rendered")
@pytest.mark.slow
def test_headless_chromium_renders_the_page_with_its_images(report_run, tmp_path):
    shot = screenshot(os.path.join(report_run, "report.html"), str(tmp_path / "shot.png"), str(tmp_path / "a"))
    assert shot.shape[:2] == (2400, 1280)
    assert shot.std() > 20 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 1000  # not blank, not one colour
    assert colourful(shot) > 0.02, colourful(shot)  # the page without its images: 0.010 (its intended-use box)
    # the same page without its PNGs beside it: text and frames only, which the check above tells apart
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(report_run, "report.html"), bare)
    without = screenshot(str(bare / "report.html"), str(tmp_path / "bare.png"), str(tmp_path / "b"))
    assert colourful(without) < 0.015, colourful(without)  # the intended-use box alone: 0.010


def test_report_md_says_what_the_heatmaps_are_and_why_there_are_none():
    """QA: report.md said "0 overlays in heatmaps/" for a night with nothing flagged (no such folder) and never said
    what a map can and cannot show."""
    from batch_job import report

    drawn = [Flagged(0.9, "/d/a.png", "", png="heatmaps/0001-x.png"), Flagged(0.8, "/d/b.png", "")]
    result = run_result(counts=reconciliation([0.9, 0.8, 0.1]), flagged=drawn, heatmaps=12, model_has_heatmaps=True,
                        map_hw=(8, 8))
    md = report.report_markdown(result)
    assert "1 overlays in `heatmaps/` (the top 2 flagged images scored in this run, `--heatmaps 12`" in md
    assert "What it cannot: a lesion's outline, which finding it is, or that the finding is real." in md
    assert "maps often peak in the same place from image to image: a hot spot is where the model looked" in md  # QA
    none = run_result(counts=reconciliation([0.1]), heatmaps=12, model_has_heatmaps=True, map_hw=(8, 8))
    assert "None: no image scored in this run was flagged." in report.report_markdown(none)
    lost = run_result(counts=reconciliation([0.9]), flagged=[Flagged(0.9, "/d/a.png", "", no_overlay="vanished")],
                      heatmaps=12, model_has_heatmaps=True, map_hw=(8, 8))
    assert "None drawn: the originals of the top 1 flagged images could no longer be read" in \
        report.report_markdown(lost)


def test_names_with_a_newline_or_a_tab_are_shown_as_escapes_not_as_other_names():
    """QA: new<LF>line.jpeg showed as "new line.jpeg" and <TAB>tab.jpeg as " tab.jpeg": names that may be real and
    other files."""
    assert html_report.display("/d/new\nline.jpeg") == "/d/new\\nline.jpeg"
    assert html_report.display("/d/\ttab.jpeg") == "/d/\\ttab.jpeg"
    assert html_report.display("/d/a b é.jpeg") == "/d/a b é.jpeg"  # spaces and letters as they are
    assert html_report.display(os.fsdecode(b"/d/M\xfcller\r.png")) == "/d/M\\xfcller\\r.png"


def test_flagged_rows_the_table_leaves_out_are_said_and_pointed_at_the_worklist(tmp_path):
    """QA: with more flagged images than the table shows (its cap, halved while the page is over 1 MB), the heading
    said "2100 flagged" and the table ended at rank 512 without a word of the rest."""
    from batch_job.worklist import Entry, WorklistSummary

    paths = [f"/data/PNEUMONIA/{i}.png" for i in range(9)]
    flagged = [Flagged(0.99 - 0.01 * i, p, "") for i, p in enumerate(paths)]
    listed = WorklistSummary(9, [(i + 1, Entry(p, "ok", f"{0.99 - 0.01 * i:.4f}", "PNEUMONIA"))
                                 for i, p in enumerate(paths)])
    result = replace(run_result(counts=reconciliation([0.99 - 0.01 * i for i in range(9)]), flagged=flagged),
                     worklist=listed)
    # the job's worklist summary keeps only the first MAX_FLAGGED_ROWS flagged rows (review: counting its rows
    # said nothing of the rest): here 6 of 9
    kept = replace(result, worklist=WorklistSummary(9, listed.flagged[:6]))
    for summary, rows_cap, shown, left in ((result, 4, 4, 3), (result, 7, 7, 0), (kept, 7, 4, 3)):
        ctx = html_report.context(summary, str(tmp_path), [], tiles_cap=2, rows_cap=rows_cap)
        assert [r["rank"] for r in ctx["rows"]] == list(range(3, 3 + shown)) and ctx["rows_left"] == left
        text = " ".join(re.sub(r"<[^>]+>", "", html.unescape(html_report.render(ctx))).split())
        said = "3 more flagged images, down to rank 9, are not shown here: worklist.csv lists them in the same order."
        assert (said in text) == bool(left)


def test_inputs_that_overlap_are_said_to_count_each_image_once(tmp_path):
    """QA: `--input X --input X/NORMAL` showed X/NORMAL as "found 0" with no word why: its images were X's."""
    one = run_result(counts=reconciliation([0.9, 0.1]))
    two = replace(one, counts=replace(one.counts, per_input={
        "X": {"found": 2, "scored": 2, "failed": 0, "skipped": 0, "out_of_scope": 0},
        "X/NORMAL": {"found": 0, "scored": 0, "failed": 0, "skipped": 0, "out_of_scope": 0}}))
    note = "An image that several inputs reach is listed and counted once, under the first of them."
    assert note in report.report_markdown(two) and note not in report.report_markdown(one)
    os.makedirs(tmp_path / "two")
    html_report.write_html(str(tmp_path / "two"), two)
    assert note in parse(str(tmp_path / "two" / "report.html"))[1]
