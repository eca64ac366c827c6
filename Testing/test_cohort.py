"""`synpo cohort` on Dask: a LocalCluster with two worker processes segments small volumes as
`synpo segment --support-image` does; a worker killed mid-write, Ctrl+C with a resumption, and an
unreadable volume each leave every output once and the table right.

The model is conftest's tiny SAM ViT (random weights) standing in for vit_b, in this process and,
through a Dask preload, in every worker process: these tests check the cohort's plumbing (the
same outputs as `synpo segment`, retries, resumption), not segmentation quality."""
import csv
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ellipsoid_volume, save_volume, synpo_cmd

distributed = pytest.importorskip("distributed")

import dask  # noqa: E402
from synpo import features  # noqa: E402
from synpo.cli import main  # noqa: E402

TINY_ARCH = (32, 2, 2, (1,))                       # conftest's vit_tiny
# Random weights decode poor masks and SAM's IoU is low: the walks' stop rules are loosened so
# that they go on and the outputs hold something to compare (the same settings for both commands).
LOOSE = ["volume.min_sam_iou=-1", "volume.min_overlap=0", "volume.min_overlap_first=0",
         "volume.min_confidence_ratio=0", "volume.min_confidence_ratio_first=0"]
MODEL = ["--device", "cpu", "--features", "sam", "--sam", "vit_b"] + [a for s in LOOSE for a in ("--set", s)]


@pytest.fixture(scope="module", autouse=True)
def tiny_vit_b(tiny_sam_checkpoint, tmp_path_factory):
    """vit_b built as the tiny ViT and loaded from its checkpoint, here and in Dask's workers."""
    preload = tmp_path_factory.mktemp("preload") / "synpo_tiny_vit_b.py"
    preload.write_text("from synpo import features\nfeatures.SAM_VIT_ARCHS['vit_b'] = %r\n" % (TINY_ARCH,))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(features.SAM_VIT_ARCHS, "vit_b", TINY_ARCH)
        mp.setenv("SYNPO_VIT_B_CHECKPOINT", tiny_sam_checkpoint)
        mp.setenv("DASK_DISTRIBUTED__WORKER__PRELOAD", json.dumps([str(preload)]))    # the CLI's own clusters
        with dask.config.set({"distributed.worker.preload": [str(preload)]}):          # this process's
            yield


def _volume(seed, shift=0):
    """Two structures: a bright ellipsoid (label 1) and a darker box (label 2), on 6 slices."""
    image, mask = ellipsoid_volume(shape=(6, 40, 48), centre=(2.5, 17 + shift, 20), radii=(2.6, 9, 11), seed=seed)
    box = np.zeros(mask.shape, dtype=bool)
    box[1:5, 26 + shift:34 + shift, 32:42] = True
    image[box] = 420.0 + np.random.default_rng(seed).normal(0, 10, int(box.sum()))
    return image, mask, box


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    image, mask, box = _volume(0)
    labels = np.zeros(mask.shape, dtype=np.uint8)
    for s in (1, 3):                               # two painted slices per label
        labels[s][mask[s]] = 1
        labels[s][box[s]] = 2
    ref = save_volume(image, folder / "ref.nii.gz")
    ref_labels = save_volume(labels, folder / "ref_labels.nii.gz")
    queries = folder / "queries"
    queries.mkdir()
    for i in (1, 2, 3):
        save_volume(_volume(i, shift=i - 2)[0], queries / ("case%d.nii.gz" % i))
    cache = str(folder / "embeddings")
    expected = {}
    for i in (1, 2, 3):                            # what `synpo segment --support-image` writes
        out = folder / ("segment_case%d.nii.gz" % i)
        assert main(["segment", str(queries / ("case%d.nii.gz" % i)), ref_labels, "-o", str(out),
                     "--support-image", ref, "--embedding-cache", cache, "--quiet"] + MODEL) == 0
        expected["case%d" % i] = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    return {"dir": folder, "ref": ref, "labels": ref_labels, "queries": queries, "cache": cache,
            "expected": expected}


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        with Client(c) as client:
            yield c, client


def _rows(outdir):
    with open(os.path.join(str(outdir), "cohort.csv"), newline="") as handle:
        return {r["name"]: r for r in csv.DictReader(handle)}


def _labels(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _no_temporaries(outdir):
    assert [p for p in os.listdir(str(outdir)) if p.startswith(".tmp")] == []


def test_outputs_equal_segment_runs_and_a_bad_volume_is_one_row(case, cluster, tmp_path, capsys):
    (case["queries"] / "broken.nii.gz").write_bytes(b"not a volume")
    out = tmp_path / "out"
    try:
        code = main(["cohort", case["ref"], case["labels"], str(case["queries"]), "-o", str(out), "--points",
                     "--scheduler", cluster[0].scheduler_address, "--embedding-cache", case["cache"]] + MODEL)
    finally:
        (case["queries"] / "broken.nii.gz").unlink()
    printed = capsys.readouterr().out
    assert code == 1, printed                                     # "some failed"
    assert "cohort: 3 of 4 volumes done, 1 failed (broken)" in printed
    rows = _rows(out)
    assert sorted(rows) == ["broken", "case1", "case2", "case3"]
    assert rows["broken"]["status"] == "failed" and "cannot read query image" in rows["broken"]["error"]
    for name, expected in case["expected"].items():
        assert rows[name]["status"] == "done" and rows[name]["error"] == ""
        assert rows[name]["settings_hash"] == rows["broken"]["settings_hash"] != ""
        got = _labels(out / (name + "_synpo.nii.gz"))
        assert np.array_equal(got, expected), name
        assert (expected == 1).any() and (expected == 2).any()        # something to compare
        found = [int(v) for v in np.unique(expected) if v]
        assert rows[name]["organs_found"] == " ".join(map(str, found))
        counts = dict(kv.split(":") for kv in rows[name]["slices_per_organ"].split())
        assert counts == {str(v): str(int(expected.reshape(6, -1).__eq__(v).any(1).sum())) for v in (1, 2)}
        assert os.path.exists(str(out / (name + "_points.json")))
    assert not os.path.exists(str(out / "broken_synpo.nii.gz"))
    _no_temporaries(out)
    # The cluster is the user's: the cohort's plugin is gone from it afterwards.
    assert "synpo-models" not in cluster[1].run(lambda dask_worker: list(dask_worker.plugins)).popitem()[1]
    # Again with the same settings: nothing to do, no cluster needed; with other settings: all again.
    argv = ["cohort", case["ref"], case["labels"], str(case["queries"]), "-o", str(out),
            "--scheduler", "tcp://127.0.0.1:9", "--embedding-cache", case["cache"]] + MODEL
    assert main(argv) == 0
    assert "3 already done with these settings (skipped), 0 to segment" in capsys.readouterr().out
    # Each row names the files its run wrote; a table from before that column: its volumes' files count as written.
    assert json.loads(rows["case3"]["outputs"]) == ["case3_points.json", "case3_synpo.nii.gz"]
    assert rows["broken"]["outputs"] == ""
    with open(str(out / "cohort.csv"), newline="") as handle:
        table = list(csv.reader(handle))
    keep = [i for i, c in enumerate(table[0]) if c != "outputs"]
    with open(str(out / "cohort.csv"), "w", newline="") as handle:
        csv.writer(handle).writerows([[r[i] for i in keep] for r in table])
    assert main(argv + ["--points"]) == 0
    assert "3 already done with these settings (skipped), 0 to segment" in capsys.readouterr().out
    argv[argv.index("--scheduler") + 1] = cluster[0].scheduler_address
    argv[3] = str(case["queries"] / "case1.nii.gz")
    assert main(argv + ["--set", "prompts.top_k=32"]) == 0
    assert "1 volume done earlier with other settings, another file or other outputs asked for (or one missing), " \
           "or a reference taken in another layout: segmented again" in capsys.readouterr().out
    again = _rows(out)
    assert sorted(again) == ["broken", "case1", "case2", "case3"]
    assert again["case1"]["settings_hash"] != rows["case1"]["settings_hash"]
    assert again["case3"] == rows["case3"]
    # Its points were the earlier run's: gone with it (they had held, and then passed for, this run's).
    assert json.loads(again["case1"]["outputs"]) == ["case1_synpo.nii.gz"] and not (out / "case1_points.json").exists()
    assert main(argv + ["--set", "prompts.top_k=32", "--points"]) == 0
    assert "0 already done with these settings (skipped), 1 to segment" in capsys.readouterr().out
    assert json.loads((out / "case1_points.json").read_text())["labels"] == [1, 2]
    _no_temporaries(out)
    # case1 segmented again (other settings) from a file that no longer reads: its row says failed, and
    # the earlier run's output is not left beside it.
    saved = (case["queries"] / "case1.nii.gz").read_bytes()
    try:
        (case["queries"] / "case1.nii.gz").write_bytes(b"not a volume any more")
        assert main(argv + ["--set", "prompts.top_k=48"]) == 1
    finally:
        (case["queries"] / "case1.nii.gz").write_bytes(saved)
    assert _rows(out)["case1"]["status"] == "failed" and not os.path.exists(str(out / "case1_synpo.nii.gz"))
    assert not (out / "case1_points.json").exists()          # (not asked for this time: the earlier run's)
    assert os.path.exists(str(out / "case2_synpo.nii.gz"))
    _no_temporaries(out)
    # A file of the user's with an output's name that no run wrote: left alone, and never taken as an output.
    (out / "case1_points.json").write_text("the user's own notes")
    assert main(argv) == 0
    assert json.loads(_rows(out)["case1"]["outputs"]) == ["case1_synpo.nii.gz"]
    assert main(argv + ["--points"]) == 2
    assert "case1_points.json exists but cohort.csv has no record of writing it" in capsys.readouterr().err
    assert (out / "case1_points.json").read_text() == "the user's own notes"


class KillOnFirstPublish(distributed.WorkerPlugin):
    """On the workers: the first output file that is about to be renamed into place SIGKILLs its
    worker instead (once in the whole cluster, a marker file says so): a worker dying mid-write."""

    def __init__(self, marker):
        self.marker = marker

    def setup(self, worker):
        from synpo import io
        original = io.publish

        def publish(tmp, path):
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return original(tmp, path)
            os.write(fd, path.encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        io.publish = publish


def test_a_worker_killed_mid_write_leaves_every_output_once(case, tmp_path, capsys):
    """The worker killed is the cluster's only one, so it holds everything the tasks need (the
    reference, the reference's embeddings): the nanny restarts it and the tasks still to run find
    them again. The reference sent as scattered data failed here every time ("lost scattered data,
    which can't be recovered"); on two workers it failed whenever the killed one held the only copy
    left by Dask's active memory manager (once in 8 runs)."""
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        with Client(c) as client:
            _kill_a_worker_mid_write(case, c, client, tmp_path, capsys)


def _kill_a_worker_mid_write(case, c, client, tmp_path, capsys):
    marker = str(tmp_path / "killed")
    client.register_plugin(KillOnFirstPublish(marker), name="kill-once")
    out = tmp_path / "out"
    try:
        code = main(["cohort", case["ref"], case["labels"], str(case["queries"]), "-o", str(out),
                     "--scheduler", c.scheduler_address, "--embedding-cache", case["cache"]] + MODEL)
    finally:
        try:                   # a restarted worker may not have it yet
            client.unregister_worker_plugin("kill-once")
        except KeyError:
            pass
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert os.path.exists(marker), "no worker was killed"
    assert open(marker).read().endswith("_synpo.nii.gz")
    rows = _rows(out)
    assert sorted(rows) == ["case1", "case2", "case3"] and all(r["status"] == "done" for r in rows.values())
    _no_temporaries(out)
    assert sorted(os.listdir(str(out))) == [".cohort.lock", "case1_synpo.nii.gz", "case2_synpo.nii.gz",
                                            "case3_synpo.nii.gz", "cohort.csv"]
    for name, expected in case["expected"].items():
        assert np.array_equal(_labels(out / (name + "_synpo.nii.gz")), expected)


def test_a_scheduler_without_workers_is_said_and_the_cohort_runs_when_one_joins(case, tmp_path, capsys):
    """A --scheduler that has no worker yet (a dask-jobqueue cluster before its jobs start): the
    cohort says it waits for one, instead of hanging silently, and runs when a worker joins. The
    volume, a NIfTI whose qform and sform disagree, gets synpo segment's placement warning in its row
    (the table said nothing)."""
    import struct
    import threading
    from distributed import Client, LocalCluster
    query = tmp_path / "case2.nii"
    sitk.WriteImage(sitk.ReadImage(str(case["queries"] / "case2.nii.gz")), str(query))
    header = bytearray(query.read_bytes())
    srow = list(struct.unpack("<12f", header[280:328]))
    srow[3] += 30.0                                         # the sform's x offset moved by 30 mm
    header[280:328] = struct.pack("<12f", *srow)
    query.write_bytes(bytes(header))
    with LocalCluster(n_workers=0, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        with Client(c) as client:
            def join_when_asked():              # a worker starts once the cohort has submitted work
                deadline = time.time() + 120
                while time.time() < deadline and not client.run_on_scheduler(
                        lambda dask_scheduler: len(dask_scheduler.tasks)):
                    time.sleep(0.2)
                c.scale(1)
            joiner = threading.Thread(target=join_when_asked, daemon=True)
            joiner.start()
            out = tmp_path / "out"
            code = main(["cohort", case["ref"], case["labels"], str(query), "-o",
                         str(out), "--scheduler", c.scheduler_address, "--embedding-cache", case["cache"]] + MODEL)
            joiner.join(10)
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "0 workers now" in printed and "cohort: waiting for a worker to join the scheduler" in printed
    assert printed.index("waiting for a worker") < printed.index("[1/1] case2")
    # What `synpo segment` writes for this file (its moved offset places it: a DICOM-like placement,
    # whose axial slices go to the encoders posterior side up, layout.rows_reversed; case2.nii.gz's
    # placement at origin 0 says nothing, and its slices go as stored).
    alone = tmp_path / "alone.nii.gz"
    assert main(["segment", str(query), case["labels"], "-o", str(alone), "--support-image", case["ref"],
                 "--embedding-cache", case["cache"], "--quiet"] + MODEL) == 0
    assert np.array_equal(_labels(out / "case2_synpo.nii.gz"), _labels(alone))
    warned = _rows(out)["case2"]["warnings"]
    assert warned.startswith("case2.nii holds two placements (its qform and sform are 30.0 mm") and \
        str(tmp_path) not in warned, warned


def test_ctrl_c_stops_cleanly_and_a_rerun_does_only_the_rest(case, tmp_path):
    """A query that never finishes reading (a FIFO nobody writes) holds the cohort; SIGINT stops
    it: exit 130, the finished volumes recorded, its worker processes gone. The re-run skips
    them and segments the rest."""
    psutil = pytest.importorskip("psutil")
    queries = tmp_path / "queries"
    queries.mkdir()
    for i in (1, 2):
        os.link(str(case["queries"] / ("case%d.nii.gz" % i)), str(queries / ("case%d.nii.gz" % i)))
    stuck = queries / "case3.nii.gz"
    os.mkfifo(str(stuck))
    out = tmp_path / "out"
    cmd = synpo_cmd() + ["cohort", case["ref"], case["labels"], str(queries), "-o", str(out), "--workers", "2",
                         "--dashboard", "none", "--embedding-cache", case["cache"]] + MODEL
    # SIGINT as a terminal delivers it (a background job's children would inherit "ignore SIGINT")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            rows = _rows(out) if os.path.exists(str(out / "cohort.csv")) else {}
            if sorted(n for n, r in rows.items() if r["status"] == "done") == ["case1", "case2"] or \
                    proc.poll() is not None:
                break
            time.sleep(0.5)
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "synpo: interrupted: 2 of 3 volumes finished and recorded" in stderr
    assert "Traceback" not in stderr
    assert len(children) >= 2
    _, alive = psutil.wait_procs(children, timeout=20)    # the worker stuck on the FIFO too
    assert alive == []
    rows = _rows(out)
    # The one not finished is "started" (with the outputs it may have written: known as the cohort's).
    assert {n: r["status"] for n, r in rows.items()} == {"case1": "done", "case2": "done", "case3": "started"}
    assert json.loads(rows["case3"]["outputs"]) == ["case3_synpo.nii.gz"]
    before = {n: os.stat(str(out / (n + "_synpo.nii.gz"))).st_mtime_ns for n in ("case1", "case2")}
    _no_temporaries(out)

    stuck.unlink()
    os.link(str(case["queries"] / "case3.nii.gz"), str(stuck))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cohort: 3 volumes, 2 already done with these settings (skipped), 1 to segment" in proc.stdout
    assert "cohort: 3 of 3 volumes done, 0 failed" in proc.stdout
    assert {n: os.stat(str(out / (n + "_synpo.nii.gz"))).st_mtime_ns for n in before} == before
    rows = _rows(out)
    assert sorted(rows) == ["case1", "case2", "case3"] and all(r["status"] == "done" for r in rows.values())
    for name, expected in case["expected"].items():
        assert np.array_equal(_labels(out / (name + "_synpo.nii.gz")), expected)


def test_output_names_in_the_table_are_exact_and_may_hold_spaces(case, cluster, tmp_path, capsys):
    """A query named "case 1" resumes (its outputs' names were split at the space: the next run took its
    own output for a user's file); a table edited by hand that names a file which is not exactly one of the
    volume's outputs never gets that file removed."""
    from synpo.cohort_queries import is_output_name
    from synpo.cohort_table import unknown_outputs
    assert is_output_name("case 1_synpo.nii.gz", "case 1") and is_output_name("c_confidence_label12.nii.gz", "c")
    # A cell from before the column ("?") or not a JSON list (edited by hand): read as a table before the column.
    assert unknown_outputs("?") and unknown_outputs('["a_synpo.nii.gz"] a_points.json') and unknown_outputs("{}")
    assert not unknown_outputs("") and not unknown_outputs('["a_synpo.nii.gz"]')
    for other in ("case 1_synpo_reviewed.nii.gz", "case 1_points.json.bak", "case 1_confidence_labelx.nii.gz",
                  "../case 1_synpo.nii.gz", "case 11_synpo.nii.gz"):
        assert not is_output_name(other, "case 1"), other
    queries = tmp_path / "queries"
    queries.mkdir()
    os.link(str(case["queries"] / "case1.nii.gz"), str(queries / "case 1.nii.gz"))
    out = tmp_path / "out"
    argv = ["cohort", case["ref"], case["labels"], str(queries), "-o", str(out), "--scheduler",
            cluster[0].scheduler_address, "--embedding-cache", case["cache"]] + MODEL
    assert main(argv) == 0
    assert main(argv) == 0
    assert "1 already done with these settings (skipped), 0 to segment" in capsys.readouterr().out
    with open(str(out / "cohort.csv"), newline="") as handle:
        table = list(csv.reader(handle))
    column = table[0].index("outputs")
    table[1][column] = json.dumps(["case 1_synpo.nii.gz", "case 1_synpo_reviewed.nii.gz"])
    with open(str(out / "cohort.csv"), "w", newline="") as handle:
        csv.writer(handle).writerows(table)
    (out / "case 1_synpo_reviewed.nii.gz").write_text("the user's reviewed copy")
    assert main(argv + ["--set", "prompts.top_k=32"]) == 0
    assert (out / "case 1_synpo_reviewed.nii.gz").read_text() == "the user's reviewed copy"


def test_a_row_from_before_the_reference_was_turned_is_segmented_again(case, cluster, tmp_path, capsys):
    """A volume stored in another axis sense than the reference gets the reference turned to its layout
    (io.orient_like), and its row says how. A row written before that column (the reference taken as
    stored: the wrong side) is segmented again; one whose volume needs no turn is still skipped. A
    draft the user corrected in place is never replaced by a run with other settings."""
    from synpo.cohort import _same_turn
    from synpo.io import read_geometry
    queries = tmp_path / "queries"
    queries.mkdir()
    flipped = sitk.DICOMOrient(sitk.ReadImage(str(case["queries"] / "case2.nii.gz")), "RPS")
    sitk.WriteImage(flipped, str(queries / "flipped.nii.gz"))
    ref_geometry = read_geometry(case["ref"])
    assert _same_turn({"reference_turn": ""}, str(case["queries"] / "case2.nii.gz"), ref_geometry)
    assert not _same_turn({"reference_turn": ""}, str(queries / "flipped.nii.gz"), ref_geometry)
    assert not _same_turn({"reference_turn": ""}, case["dir"] / "missing.nii.gz", ref_geometry)
    out = tmp_path / "out"
    argv = ["cohort", case["ref"], case["labels"], str(queries), "-o", str(out), "--scheduler",
            cluster[0].scheduler_address, "--embedding-cache", case["cache"]] + MODEL
    assert main(argv) == 0
    assert _rows(out)["flipped"]["reference_turn"] == "i<-i-,j<-j,k<-k"
    assert main(argv) == 0
    assert "1 already done with these settings (skipped), 0 to segment" in capsys.readouterr().out
    with open(str(out / "cohort.csv"), newline="") as handle:
        table = list(csv.reader(handle))
    keep = [i for i, c in enumerate(table[0]) if c != "reference_turn"]
    with open(str(out / "cohort.csv"), "w", newline="") as handle:        # a table from before the column
        csv.writer(handle).writerows([[r[i] for i in keep] for r in table])
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "0 already done with these settings (skipped), 1 to segment" in printed
    assert "or a reference taken in another layout" in printed
    assert _rows(out)["flipped"]["reference_turn"] == "i<-i-,j<-j,k<-k"
    # The user corrects the draft in place: a run with other settings does not replace it unasked.
    draft = out / "flipped_synpo.nii.gz"
    corrected = _labels(draft)
    corrected[0, 0, 0] = 7
    sitk.WriteImage(sitk.GetImageFromArray(corrected), str(draft))
    st = os.stat(str(draft))                                 # (saved a while after the run wrote it)
    os.utime(str(draft), ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10 ** 9))
    assert main(argv + ["--set", "prompts.top_k=32"]) == 2
    err = capsys.readouterr().err
    assert "flipped_synpo.nii.gz was changed after synpo cohort wrote it" in err and "move it out" in err
    assert np.array_equal(_labels(draft), corrected)
    assert main(argv) == 0                                   # the same settings: skipped, the draft kept
    assert np.array_equal(_labels(draft), corrected)
    # Another site's volume of the same name, into the same folder: refused, the first one's draft kept.
    site2 = tmp_path / "site2"
    site2.mkdir()
    os.link(str(case["queries"] / "case3.nii.gz"), str(site2 / "flipped.nii.gz"))
    argv[3] = str(site2)
    assert main(argv) == 2
    assert "holds the outputs of flipped from" in capsys.readouterr().err
    assert np.array_equal(_labels(draft), corrected)
    # A run with other settings interrupted before it reached the volume leaves its row "started": the
    # next run does not replace the corrected draft either (the row's stamps had been cleared: it did).
    from synpo.cohort import _mark_started
    from synpo.cohort_table import read_rows
    argv[3] = str(queries)
    rows = read_rows(str(out / "cohort.csv"))
    _mark_started(["flipped"], {"flipped": str(queries / "flipped.nii.gz")}, rows, str(out / "cohort.csv"), str(out),
                  {"confidence": False, "points": False, "labels": [1, 2]})
    assert _rows(out)["flipped"]["status"] == "started"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "flipped_synpo.nii.gz was changed after synpo cohort last finished it" in err and "interrupted" in err
    assert np.array_equal(_labels(draft), corrected)


class HoldRead(distributed.WorkerPlugin):
    """On the workers: reading a query named `held.nii.gz` says so (the file `started`) and waits for
    the file `go` (two minutes at most), as a volume being segmented when Ctrl+C comes."""

    def __init__(self, started, go):
        self.started, self.go = started, go

    def setup(self, worker):
        from synpo import io
        self.original = original = io.read_volume

        def read_volume(path, *args, **kwargs):
            if os.path.basename(path) == "held.nii.gz":
                open(self.started, "w").close()
                deadline = time.time() + 120
                while not os.path.exists(self.go) and time.time() < deadline:
                    time.sleep(0.05)
            return original(path, *args, **kwargs)
        io.read_volume = read_volume

    def teardown(self, worker):
        from synpo import io
        io.read_volume = self.original


def test_outputs_a_task_writes_after_its_run_was_interrupted_are_the_cohorts(case, cluster, tmp_path, capsys):
    """Ctrl+C cancels the tasks, but one already running on a --scheduler's worker goes on and puts its
    outputs in place after the command has ended: no row stamps them. The next run took them for a draft
    the user had corrected since the last finished run, and refused to segment the volume again. The
    task's record of what it put in place (.NAME.RUN.cohort-pending.json) makes them the cohort's; one the
    user changes after that is still refused."""
    c, client = cluster
    queries = tmp_path / "queries"
    queries.mkdir()
    os.link(str(case["queries"] / "case1.nii.gz"), str(queries / "held.nii.gz"))
    out = tmp_path / "out"
    argv = ["cohort", case["ref"], case["labels"], str(queries), "-o", str(out), "--scheduler",
            c.scheduler_address, "--embedding-cache", case["cache"]] + MODEL
    assert main(argv + ["--confidence-all"]) == 0            # done with other settings: its output stamped
    output = out / "held_synpo.nii.gz"
    first = os.stat(str(output)).st_mtime_ns
    started, go = tmp_path / "started", tmp_path / "go"
    client.register_plugin(HoldRead(str(started), str(go)), name="hold-read")
    try:
        def ctrl_c_while_it_runs(*args, **kwargs):
            deadline = time.time() + 120
            while not started.exists() and time.time() < deadline:
                time.sleep(0.05)
            raise KeyboardInterrupt
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(distributed, "as_completed", ctrl_c_while_it_runs)
            assert main(argv) == 130
        assert started.exists() and _rows(out)["held"]["status"] == "started"
        go.write_text("")                                       # the task goes on with no command left
        deadline = time.time() + 120
        while os.stat(str(output)).st_mtime_ns == first and time.time() < deadline:
            time.sleep(0.1)
        assert os.stat(str(output)).st_mtime_ns != first, "the task did not write"
    finally:
        client.unregister_worker_plugin("hold-read")
    capsys.readouterr()
    # A file the user changes after the task wrote it is theirs.
    written = os.stat(str(output))
    os.utime(str(output), ns=(written.st_atime_ns, written.st_mtime_ns + 10 ** 10))
    assert main(argv) == 2
    assert "held_synpo.nii.gz was changed after synpo cohort last finished it" in capsys.readouterr().err
    # As the task left it: the cohort's, segmented again without a question.
    os.utime(str(output), ns=(written.st_atime_ns, written.st_mtime_ns))
    assert main(argv) == 0, capsys.readouterr().err
    assert _rows(out)["held"]["status"] == "done"
    assert np.array_equal(_labels(output), case["expected"]["case1"])
    _no_temporaries(out)
    assert sorted(os.listdir(str(out))) == [".cohort.lock", "cohort.csv", "held_synpo.nii.gz"]


def test_a_tasks_record_of_its_outputs_tells_the_cohorts_files_from_the_users(tmp_path):
    """cohort_pending: a file as a task's record says it was put in place is the cohort's ("put"); one the
    record names that has changed since is the user's ("changed"); a record none of whose files is there
    goes; the run that writes the volume's row removes its own record and those that describe nothing now."""
    from synpo.cohort_pending import pending_outputs, pending_records, settle_pending, write_pending
    out = str(tmp_path)

    def put_in_place(name, run, base, text):
        staged = os.path.join(out, ".tmp-x-" + base)
        with open(staged, "w") as handle:
            handle.write(text)
        write_pending(out, name, run, [(staged, os.path.join(out, base))])
        os.replace(staged, os.path.join(out, base))
    put_in_place("a", "0a", "a_synpo.nii.gz", "first")
    put_in_place("a", "0b", "a_points.json", "points")
    put_in_place("a.b", "0c", "a.b_synpo.nii.gz", "another volume")          # (not volume a's)
    assert pending_outputs(out, "a") == ({"a_synpo.nii.gz", "a_points.json"}, set())
    points = os.stat(os.path.join(out, "a_points.json"))
    os.utime(os.path.join(out, "a_points.json"), ns=(points.st_atime_ns, points.st_mtime_ns + 10 ** 10))
    assert pending_outputs(out, "a") == ({"a_synpo.nii.gz"}, {"a_points.json"})
    os.unlink(os.path.join(out, "a_points.json"))                             # its record goes with it
    assert pending_outputs(out, "a") == ({"a_synpo.nii.gz"}, set())
    assert [os.path.basename(r) for r in pending_records(out, "a")] == [".a.0a.cohort-pending.json"]
    put_in_place("a", "1f", "a_synpo.nii.gz", "second run's")                  # another run, its row written
    settle_pending(out, "a", "1f")
    assert pending_records(out, "a") == [] and len(pending_records(out, "a.b")) == 1
    assert sorted(os.listdir(out)) == [".a.b.0c.cohort-pending.json", "a.b_synpo.nii.gz", "a_synpo.nii.gz"]


def test_usage_errors_are_one_line_before_anything_starts(case, tmp_path, capsys):
    out = tmp_path / "out"
    for argv, says in (
        ([case["ref"], case["labels"], str(tmp_path / "nope.nii.gz")], "query file not found"),
        ([case["ref"], case["labels"], str(tmp_path / "*.nrrd")], "no file matches the query pattern"),
        ([case["ref"], case["ref"], str(case["queries"])], "non-integer values"),
        ([case["ref"], case["labels"], str(case["queries"]), "--workers", "0"], "--workers must be >= 1"),
    ):
        assert main(["cohort"] + argv + ["-o", str(out)] + MODEL) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("synpo: error: ") and says in err[0], err
    # A pattern takes volume files only (a BIDS sidecar beside each volume named like it was a twin).
    sidecar = case["queries"] / "case1.json"
    sidecar.write_text("{}")
    try:
        from synpo.cohort_dask import memory_limit
        from synpo.cohort_queries import expand_queries
        assert expand_queries([str(case["queries"] / "case1*")], [], str(out)) == [str(case["queries"] / "case1.nii.gz")]
        assert main(["cohort", case["ref"], case["labels"], str(case["queries"] / "*.json"), "-o", str(out)]
                    + MODEL) == 2
        assert "no file matches the query pattern" in capsys.readouterr().err
    finally:
        sidecar.unlink()
    assert memory_limit("2GB") == 2 * 10 ** 9                 # (as Dask reads it)
    # The query folder given as the output folder: its volumes are outputs' neighbours, never queries.
    assert main(["cohort", case["ref"], case["labels"], str(case["queries"]), "-o", str(case["queries"])] + MODEL) == 2
    assert "is the output folder (-o)" in capsys.readouterr().err
    twin = tmp_path / "twin"
    twin.mkdir()
    os.link(str(case["queries"] / "case1.nii.gz"), str(twin / "case1.nii.gz"))
    assert main(["cohort", case["ref"], case["labels"], str(case["queries"]), str(twin), "-o", str(out)] + MODEL) == 2
    assert "two queries are both named case1" in capsys.readouterr().err
    out.mkdir(exist_ok=True)
    (out / "case2_synpo.nii.gz").write_bytes(b"the user's own file")
    assert main(["cohort", case["ref"], case["labels"], str(case["queries"]), "-o", str(out)] + MODEL) == 2
    assert "it is not a cohort output" in capsys.readouterr().err
    assert (out / "case2_synpo.nii.gz").read_bytes() == b"the user's own file"
    (out / ".cohort.lock").unlink()
    (out / ".cohort.lock").mkdir()
    (out / "case2_synpo.nii.gz").unlink()
    assert main(["cohort", case["ref"], case["labels"], str(case["queries"]), "-o", str(out)] + MODEL) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err
    assert main(["cohort", case["ref"], case["labels"], str(case["queries"]), "-o", ""] + MODEL) == 2
    assert "--output is empty" in capsys.readouterr().err
    fresh = tmp_path / "never"
    for extra, says in ((["--scheduler", "nonsense"], "is not a scheduler address"),
                        (["--scheduler", "http://127.0.0.1:8786"], "is not a scheduler address"),
                        (["--memory-limit=-2GB"], "at least 2"), (["--memory-limit", "10kB"], "at least 2"),
                        (["--memory-limit", "0.5"], "at least 2"), (["--memory-limit", "1.5GiB"], "at least 2GB"),
                        (["--dashboard", "notaport"], "give :PORT"),
                        (["--dashboard", "nohost.invalid:8787"], "host nohost.invalid"),
                        # (the plan's line "N volumes ... to segment" came first)
                        (["--workers", "100000"], "under the 2GB a worker needs")):
        assert main(["cohort", case["ref"], case["labels"], str(case["queries"]), "-o", str(fresh)] + extra
                    + MODEL) == 2
        printed = capsys.readouterr()
        err = printed.err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and printed.out == "", (err, printed.out)
        assert not fresh.exists()                                 # nothing made before the refusal


def test_the_shared_reference_embeddings_spare_every_query_the_reference_slices(case):
    """inject_reference puts the reference task's embeddings where a query's run looks for them:
    the run embeds query slices only, and its result is the one it gets on its own."""
    from synpo.cohort_task import _reference_slices, inject_reference
    from synpo.config import configured
    from synpo.io import read_volume
    from synpo.session import Models, Session
    from synpo.support import find_support, in_plane_spacing
    from synpo.volume import EmbeddingStore
    cfg = configured(LOOSE)
    models = Models.load("vit_b", "sam", device="cpu")
    ref, ref_geometry = read_volume(case["ref"])
    labels, _ = read_volume(case["labels"], label=True)
    support = find_support(labels)
    slices = _reference_slices(ref, cfg, support.axis)
    frame = models.sam.frame(slices.shape[1], slices.shape[2], in_plane_spacing(ref_geometry.spacing, support.axis))
    store = EmbeddingStore(models.sam, slices, frame, 1, case["cache"])     # as the reference task does
    painted = sorted({s for v in support.slices.values() for s in v})
    store.ensure(painted)
    features = {"axis": support.axis, "encoders": {"sam": (frame, {i: store.cache[i] for i in painted})}}
    image, geometry = read_volume(str(case["queries"] / "case2.nii.gz"))
    embedded = []
    original = models.sam.embed

    def counting(batch, fr):
        embedded.extend(np.asarray(batch))
        return original(batch, fr)
    models.sam.embed = counting
    session = Session(image, geometry.spacing, models)              # no disk cache: every slice is embedded here
    assert inject_reference(session, features, ref, cfg, geometry.spacing)
    result = session.run(labels, cfg, support_image=ref)
    assert len(embedded) == len(result.computed) > 0
    assert not any(np.array_equal(e, slices[s]) for e in embedded for s in painted)
    assert np.array_equal(result.labels, case["expected"]["case2"])


def test_stale_temporaries_are_only_the_volumes_own(tmp_path):
    """A volume's task removes the temporary files a killed run left for its outputs (mkstemp's
    ".tmp-" + random letters, digits or "_" + "-" + the name), never those of a volume whose name ends
    in its name: volume "b" removed "x-b"'s file while it was being written."""
    import tempfile
    from synpo.cohort_table import remove_stale_temporaries
    _, own = tempfile.mkstemp(prefix=".tmp-", suffix="-b_synpo.nii.gz", dir=str(tmp_path))
    _, other = tempfile.mkstemp(prefix=".tmp-", suffix="-x-b_synpo.nii.gz", dir=str(tmp_path))
    _, other2 = tempfile.mkstemp(prefix=".tmp-", suffix="-x_b_synpo.nii.gz", dir=str(tmp_path))
    remove_stale_temporaries([str(tmp_path / "b_synpo.nii.gz")])
    assert not os.path.exists(own) and os.path.exists(other) and os.path.exists(other2)


def test_a_detached_headers_data_file_is_part_of_its_stamp(tmp_path):
    """A query stored as a header and a data file (.nhdr + .raw, .mhd + .raw): new voxels in the data
    file, with the header untouched, make the next run segment it again (it was skipped as done)."""
    from synpo.cohort_table import file_stamp
    for name in ("case.nhdr", "case.mhd"):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        header = folder / name
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)), str(header))
        data = [p for p in folder.iterdir() if p != header]
        assert len(data) == 1
        before = file_stamp(str(header))
        stat = os.stat(str(header))
        data[0].write_bytes(bytes(reversed(data[0].read_bytes())) + b"")
        os.utime(str(data[0]), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
        assert os.stat(str(header)).st_mtime_ns == stat.st_mtime_ns and file_stamp(str(header)) != before


def test_a_label_map_or_another_modality_among_the_queries_is_said_in_its_row():
    """Both are segmented all the same (a folder of image_N and label_N files; a CT among MR volumes);
    the row's warnings say what the volume looks like."""
    from synpo.cohort_task import _input_warnings
    mr, mask = ellipsoid_volume(shape=(6, 40, 48), centre=(2.5, 17, 20), radii=(2.6, 9, 11), seed=1)
    ct = np.where(mask, 60.0, -1000.0).astype(np.float32) + np.round(np.random.default_rng(0).normal(0, 20, mask.shape))
    assert _input_warnings(mr, "mr") == []
    assert _input_warnings(mask.astype(np.float32) * 3, "mr") == ["only 2 distinct values: a label map, not an image?"]
    assert _input_warnings(ct, "mr") == ["looks like CT, the reference like MR"]
    assert _input_warnings(mr, "ct-windowed") == ["looks like MR, the reference like CT"]


def _small_reference(folder):
    """A reference and its labels (two labels, two painted slices) in `folder`, without segmenting anything."""
    image, mask, box = _volume(0)
    labels = np.zeros(mask.shape, dtype=np.uint8)
    for s in (1, 3):
        labels[s][mask[s]] = 1
        labels[s][box[s]] = 2
    return save_volume(image, folder / "ref.nii.gz"), save_volume(labels, folder / "ref_labels.nii.gz")


def test_a_table_that_cannot_be_written_is_one_error_line(tmp_path):
    """A full disk (here a file-size limit) while cohort.csv is rewritten: a SynPoError (one `synpo: error:`
    line, the cluster closed), not an OSError's traceback and exit status 1 ("some volumes failed"); the
    table written before stays whole and no temporary file is left."""
    resource = pytest.importorskip("resource")
    from synpo.cohort_table import COLUMNS, write_rows
    from synpo.errors import SynPoError
    path = str(tmp_path / "cohort.csv")
    small = {"case1": dict({c: "" for c in COLUMNS}, name="case1", status="started")}
    write_rows(path, small)
    before = open(path).read()
    big = {"case%d" % i: dict({c: "x" * 100 for c in COLUMNS}, name="case%d" % i) for i in range(20)}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))        # (Python ignores SIGXFSZ: writes fail EFBIG)
    try:
        with pytest.raises(SynPoError) as info:
            write_rows(path, big)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(info.value).startswith("cannot write %s: " % path) and "\n" not in str(info.value)
    assert open(path).read() == before
    assert sorted(os.listdir(str(tmp_path))) == ["cohort.csv"]


def test_query_names_that_differ_only_in_case_are_refused(tmp_path, capsys):
    """Case1.nii.gz and case1.nii.gz from two folders: on a file system that ignores case (macOS, Windows, many
    shares) their outputs are one file, the second volume's draft silently replacing the first's."""
    ref, labels = _small_reference(tmp_path)
    for folder, name in (("site1", "Case1"), ("site2", "case1")):
        (tmp_path / folder).mkdir()
        save_volume(_volume(1)[0], tmp_path / folder / (name + ".nii.gz"))
    out = tmp_path / "out"
    assert main(["cohort", ref, labels, str(tmp_path / "site1"), str(tmp_path / "site2"), "-o", str(out)] + MODEL) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "two queries are both named Case1 or case1" in err[0], err
    assert not out.exists()


def test_the_output_folder_given_among_query_folders_is_refused(tmp_path, capsys):
    """`synpo cohort REF LABELS data/ more/ -o data/`: data/'s volumes were left out in silence (taken for
    outputs) and only more/'s segmented; refused as the output folder alone is."""
    from synpo.cohort_queries import expand_queries
    from synpo.errors import SynPoError
    ref, labels = _small_reference(tmp_path)
    for folder in ("data", "more"):
        (tmp_path / folder).mkdir()
        save_volume(_volume(1)[0], tmp_path / folder / (folder + "1.nii.gz"))
    with pytest.raises(SynPoError, match="is the output folder"):
        expand_queries([str(tmp_path / "data"), str(tmp_path / "more")], [], str(tmp_path / "data"))
    assert main(["cohort", ref, labels, str(tmp_path / "data"), str(tmp_path / "more"), "-o", str(tmp_path / "data")]
                + MODEL) == 2
    assert "is the output folder (-o)" in capsys.readouterr().err
    assert sorted(os.listdir(str(tmp_path / "data"))) == ["data1.nii.gz"]
    # A pattern over several folders still leaves the output folder's files out (a re-run's own outputs).
    assert expand_queries([str(tmp_path / "*" / "*.nii.gz")], [], str(tmp_path / "data")) == \
        [str(tmp_path / "more" / "more1.nii.gz")]


def test_a_local_clusters_workers_each_get_the_memory_a_worker_needs(monkeypatch):
    """The default worker count is the cores' (16 here) but no more than the memory holds at 2GB a worker (8GB
    here: 4); an explicit --workers whose share is under 2GB is refused as --memory-limit under 2GB is (workers
    died loading the models, or sat paused)."""
    import argparse
    import psutil
    from synpo import cohort_dask
    from synpo.errors import SynPoError
    started = {}

    class FakeCluster:
        def __init__(self, **kwargs):
            started.update(kwargs)
    monkeypatch.setattr(distributed, "LocalCluster", FakeCluster)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: argparse.Namespace(total=8 * 10 ** 9))
    args = argparse.Namespace(workers=None, threads_per_worker=None, memory_limit="auto", dashboard="none")
    cohort_dask.local_cluster(args, lambda msg: None)
    assert started["n_workers"] == 4 and started["memory_limit"] == 2 * 10 ** 9
    args.workers = 3
    cohort_dask.local_cluster(args, lambda msg: None)
    assert started["n_workers"] == 3
    args.workers = 8
    with pytest.raises(SynPoError, match="--workers 8: .* under the 2GB"):
        cohort_dask.local_cluster(args, lambda msg: None)
    args.memory_limit = "0"                                       # stated: no limit, as asked
    cohort_dask.local_cluster(args, lambda msg: None)
    assert started["n_workers"] == 8 and started["memory_limit"] == 0


def test_a_local_clusters_workers_leave_ctrl_c_to_the_command():
    """Ctrl+C in a terminal reaches the local cluster's worker processes too (one process group); a second
    one interrupted a worker while the command closed it, and its traceback ended the output. The worker
    plugin makes a local cluster's worker ignore SIGINT (the command closes it); a --scheduler's workers are
    the user's, and keep their Ctrl+C."""
    import asyncio
    from synpo.cohort_dask import SynPoModels
    spec = {"sam": "vit_b", "features": "sam", "dinov2": "small", "device": "cpu", "precision": "auto",
            "runtime": "torch"}
    before = signal.getsignal(signal.SIGINT)
    try:
        for local, ignored in ((False, False), (True, True)):
            signal.signal(signal.SIGINT, signal.default_int_handler)
            asyncio.run(SynPoModels(spec, 1, local=local).setup(None))     # (the main thread, as in a worker)
            assert (signal.getsignal(signal.SIGINT) is signal.SIG_IGN) == ignored, local
    finally:
        signal.signal(signal.SIGINT, before)


def test_an_unreadable_nrrds_row_says_why(tmp_path):
    """ITK's NRRD reader puts its reason on its message's last line, after "Error reading X:": a volume's
    `error` cell ended at that colon, with no reason."""
    from synpo.io import read_volume
    from synpo.errors import InputError
    bad = tmp_path / "bad.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 10 10 10\nencoding: raw\n\n" + bytes(2000))
    with pytest.raises(InputError) as info:
        read_volume(str(bad), "query image")
    assert "require endian info" in str(info.value) and "\n" not in str(info.value), str(info.value)
