"""Patient data (issue 21, item 9): OUT_DIR and the ledger are readable by their owner and group only, and the
job's log never names a patient's file or DICOM field."""
from __future__ import annotations

import io
import logging
import os
import stat

import numpy as np
import pytest

from batch_job.cli import main
from batch_job.outdir import make_private
from batch_job.synthetic import make_tree
from dicom_factory import dicom_bytes
from helpers import textured


def modes(folder: str) -> dict[str, int]:
    """{path relative to folder ('.' itself): permission bits} of everything under it."""
    out = {".": stat.S_IMODE(os.stat(folder).st_mode)}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, folder)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


@pytest.fixture
def umask_022():
    old = os.umask(0o022)  # what most systems give a service: everything world-readable
    try:
        yield
    finally:
        os.umask(old)


def test_out_dir_and_ledger_are_for_owner_and_group_only(heat_package, tmp_path, umask_022):
    inp = tmp_path / "in"
    make_tree(str(inp), per_class=4, size=64, seed=2)
    out, ledger = tmp_path / "scores" / "night1", tmp_path / "books" / "ledger.sqlite"
    assert main(["--input", str(inp), "--model", heat_package, "--output", str(out), "--ledger", str(ledger),
                 "--direct_num_workers=2", "--shard-size", "3"]) == 0
    found = modes(str(out))
    assert "heatmaps" in found and "predictions-00002.csv" in found  # worker-written files, a subfolder
    for rel, mode in found.items():
        want = 0o750 if os.path.isdir(out / rel) else 0o640
        assert mode == want, (rel, oct(mode))
    for path, want in ((tmp_path / "scores", 0o750), (tmp_path / "books", 0o750), (ledger, 0o640),
                       (str(ledger) + ".lock", 0o640)):
        assert stat.S_IMODE(os.stat(path).st_mode) == want, (path, oct(os.stat(path).st_mode))
    assert os.umask(0o022) == 0o022  # the caller's umask is back


def test_a_setgid_parent_keeps_its_group_on_out_dir(tiny_package, tmp_path, umask_022):
    """docs/operations.md, "Who reads OUT_DIR": a parent folder owned by the readers' group with the setgid bit
    gives every night's OUT_DIR that group."""
    group = next((g for g in (100, 1, 2, 3) if g != os.getgid()), None)
    parent = tmp_path / "scores"
    parent.mkdir()
    try:
        os.chown(parent, -1, group)
    except PermissionError:
        pytest.skip("cannot give a folder another group here")
    os.chmod(parent, 0o2770)
    inp = tmp_path / "in"
    make_tree(str(inp), per_class=2, size=64, seed=2)
    assert main(["--input", str(inp), "--model", tiny_package, "--output", str(parent / "night1"),
                 "--direct_running_mode=in_memory"]) == 0
    st = os.stat(parent / "night1")
    assert st.st_gid == group and st.st_mode & stat.S_ISGID and stat.S_IMODE(st.st_mode) & 0o777 == 0o750
    assert os.stat(parent / "night1" / "metrics.json").st_gid == group


def test_an_existing_ledger_readable_by_others_is_restricted_with_a_warning(tiny_package, tmp_path, job_log,
                                                                            umask_022):
    inp = tmp_path / "in"
    make_tree(str(inp), per_class=2, size=64, seed=2)
    ledger = str(tmp_path / "ledger.sqlite")
    common = ["--input", str(inp), "--model", tiny_package, "--ledger", ledger, "--direct_running_mode=in_memory"]
    assert main(common + ["--output", str(tmp_path / "n1")]) == 0
    os.chmod(ledger, 0o644)  # as the version before made it
    assert main(common + ["--output", str(tmp_path / "n2")]) == 0
    assert stat.S_IMODE(os.stat(ledger).st_mode) == 0o640
    assert f"{ledger} was readable or writable by others: now by its owner and group only" in job_log.text


def test_make_private_leaves_links_and_setgid_bits(tmp_path):
    (tmp_path / "d").mkdir()
    os.chmod(tmp_path / "d", 0o2777)
    (tmp_path / "d" / "f.csv").write_text("x")
    os.chmod(tmp_path / "d" / "f.csv", 0o666)  # a Dask worker with umask 000
    os.symlink("/etc/hostname", tmp_path / "d" / "link")
    make_private(str(tmp_path / "d"))
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o2750
    assert stat.S_IMODE(os.stat(tmp_path / "d" / "f.csv").st_mode) == 0o640
    assert os.readlink(tmp_path / "d" / "link") == "/etc/hostname"


IDENTIFIERS = ("DOE^JANE", "998877", "ACC-55555", "SMITH", "1.2.826.0.1.3680043.8.498.4242")


def dicom_with_identifiers(pixels: np.ndarray) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(pixels)))
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "DOE^JANE", "MRN998877", "ACC-55555"
    ds.StudyInstanceUID = IDENTIFIERS[-1]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_the_log_names_no_patient_file_or_field(heat_package, tmp_path, monkeypatch, capsys):
    """Files named by patient (name, record number), DICOM files with identifiers, a broken file, and a flagged
    original that vanishes before its overlay is drawn (the one warning that used to name a file): every line the
    job logs, at any level, and its stderr hold none of them."""
    from batch_job import heatmaps

    inp = tmp_path / "in" / "PNEUMONIA"
    inp.mkdir(parents=True)
    textured((64, 64), 230).save(inp / "DOE^JANE MRN998877.png")  # bright: flagged by the tiny model
    (inp / "SMITH^JOHN MRN123.jpeg").write_bytes(b"not an image")
    (inp / "ACC-55555.dcm").write_bytes(dicom_with_identifiers(np.full((64, 64), 220, np.uint8)))
    real = heatmaps.make_heatmaps

    def vanish_first(out_dir, chosen, *args):
        os.remove(chosen[0].path)  # gone between scoring and drawing
        return real(out_dir, chosen, *args)

    monkeypatch.setattr(heatmaps, "make_heatmaps", vanish_first)
    records: list[str] = []

    class Everything(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler, root, job = Everything(logging.DEBUG), logging.getLogger(), logging.getLogger("batch_job")
    levels = root.level, job.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        rc = main(["--input", str(tmp_path / "in"), "--model", heat_package, "--output", str(tmp_path / "out"),
                   "--ledger", str(tmp_path / "ledger.sqlite"), "--direct_running_mode=in_memory",
                   "--log-level", "DEBUG"])
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        job.setLevel(levels[1])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    logged = "\n".join(records)
    assert "no heatmap for flagged image 1 (heatmaps/index.csv)" in logged  # the warning is there, nameless
    for secret in IDENTIFIERS + ("MRN",):
        assert secret not in logged and secret not in stderr and secret not in stdout, secret
    shards = "".join(open(path).read() for path in (tmp_path / "out").glob("predictions-*.csv"))
    assert "DOE^JANE MRN998877.png" in shards  # the CSVs have it
