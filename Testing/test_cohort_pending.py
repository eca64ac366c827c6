"""cohort_pending without a Dask cluster: a task's record of the outputs it put in place."""
import argparse
import json
import os

import pytest


def _put_in_place(out, name, run, base, text):
    from synpo.cohort_pending import write_pending
    staged = os.path.join(out, ".tmp-x-" + base)
    with open(staged, "w") as handle:
        handle.write(text)
    write_pending(out, name, run, [(staged, os.path.join(out, base))])
    os.replace(staged, os.path.join(out, base))


def _run_killed(tmp_path, monkeypatch, rows, before_death=None):
    """cohort._run_tasks for one volume "v" with Dask faked: its task's worker dies (KilledWorker), after
    `before_death(run id)` has run. Returns the run's id."""
    distributed = pytest.importorskip("distributed")
    from synpo import cohort
    out = str(tmp_path)
    runs = []

    class Future:
        def __init__(self, fn, key):
            self.fn, self.key = fn, key

        def result(self):
            if self.fn is cohort.segment_query:
                if before_death is not None:
                    before_death(runs[0])
                raise RuntimeError("KilledWorker")
            return {"models": {}}

        def cancel(self):
            pass

    class Client:
        dashboard_link = ""

        def __init__(self, *args, **kwargs):
            pass

        def scheduler_info(self):
            return {"workers": {"w": {}}, "services": {}}

        def register_plugin(self, *args, **kwargs):
            pass

        def unregister_worker_plugin(self, *args, **kwargs):
            pass

        def submit(self, fn, *args, key="", **kwargs):
            if fn is cohort.segment_query:
                runs.append(key.rsplit("-", 1)[1])
            return Future(fn, key)

        def close(self):
            pass
    monkeypatch.setattr(distributed, "Client", Client)
    monkeypatch.setattr(distributed, "as_completed", lambda futures: iter(futures))
    args = argparse.Namespace(scheduler="tcp://127.0.0.1:1", threads_per_worker=1, dashboard=":8787",
                              sam="vit_b", features="sam", dinov2="small", device="cpu", precision="auto",
                              runtime="torch", output=out)
    options = {"hash": "h", "confidence": False, "points": False, "n_painted": 1, "confidence_all": False,
               "labels": [1], "embedding_cache": None}
    query = tmp_path / "v.nii.gz"
    query.write_text("")
    assert cohort._run_tasks(args, None, ("r", "l", ("", "")), ["v"], {"v": str(query)}, rows,
                             os.path.join(out, "cohort.csv"), options, lambda msg: None, {}) == 1
    assert rows["v"]["status"] == "failed"
    return runs[0]


def _corrected(path):
    """The user corrects the file: a later modification time."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 10))


def test_a_volume_whose_worker_died_after_its_renames_keeps_its_tasks_record(tmp_path, monkeypatch):
    """A task that put its outputs in place and whose worker then died (Dask's KilledWorker) is a "failed"
    row, which stamps no output: the task's record is all that tells the file the task wrote from one the
    user corrects afterwards. The client removed it all the same (settle_pending after every row), and the
    next run replaced the corrected file without asking."""
    from synpo.cohort_pending import pending_outputs, pending_records
    out, rows = str(tmp_path), {}
    _run_killed(tmp_path, monkeypatch, rows,
                lambda run: _put_in_place(out, "v", run, "v_synpo.nii.gz", "the task's labels"))
    assert json.loads(rows["v"]["outputs"]) == ["v_synpo.nii.gz"]
    assert len(pending_records(out, "v")) == 1
    _corrected(os.path.join(out, "v_synpo.nii.gz"))
    assert pending_outputs(out, "v") == (set(), {"v_synpo.nii.gz"})  # asked about on the next run


def test_a_volume_whose_worker_died_before_its_renames_keeps_the_last_finished_runs_stamps(tmp_path, monkeypatch):
    """The last finished run's outputs, stamped in the row ("started" keeps them: _mark_started): a task of
    the next run whose worker died before its renames left a "failed" row without those stamps, so a draft
    the user then corrected was no longer known as changed, and the run after replaced it without asking."""
    from synpo.cohort_table import COLUMNS, edited_outputs, file_stamp
    out = str(tmp_path)
    labels = os.path.join(out, "v_synpo.nii.gz")
    with open(labels, "w") as handle:
        handle.write("the last finished run's labels")
    stamps = json.dumps({"v_synpo.nii.gz": file_stamp(labels)})
    rows = {"v": dict({c: "" for c in COLUMNS}, name="v", status="started", outputs='["v_synpo.nii.gz"]',
                      output_stamps=stamps)}
    _run_killed(tmp_path, monkeypatch, rows)
    assert rows["v"]["output_stamps"] == stamps
    _corrected(labels)
    assert edited_outputs(rows["v"], out) == [labels]


def test_a_record_of_a_volume_with_a_long_name_is_written(tmp_path):
    """A volume whose name is a long as its outputs' names allow (the file system's 255 bytes): its record's
    name (".NAME.RUN.cohort-pending.json", and the temporary one beside it) was too long, and the volume,
    which segmented before the records, failed ("File name too long")."""
    from synpo.cohort_pending import pending_outputs, pending_records, settle_pending
    out = str(tmp_path)
    name = "n" * 215                           # its labels' temporary file: 14 + 215 + 13 = 242 bytes
    _put_in_place(out, name, "0a1b2c3d", name + "_synpo.nii.gz", "labels")
    assert pending_outputs(out, name) == ({name + "_synpo.nii.gz"}, set())
    other = "n" * 214 + "m"                    # (another volume's record is not this one's)
    _put_in_place(out, other, "0b1b2c3d", other + "_synpo.nii.gz", "labels")
    assert len(pending_records(out, name)) == 1 and len(pending_records(out, other)) == 1
    settle_pending(out, name, "0a1b2c3d")
    assert pending_records(out, name) == [] and len(pending_records(out, other)) == 1
    wide = "\u00e9" * 108                      # 216 bytes: the limit is the file system's, in bytes
    _put_in_place(out, wide, "0c1b2c3d", wide + "_synpo.nii.gz", "labels")
    assert pending_outputs(out, wide) == ({wide + "_synpo.nii.gz"}, set())
