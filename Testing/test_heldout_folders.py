"""Data folders laid out as held-out copies may be: other numbers, other folder names, other dtypes."""
import os

import numpy as np

from conftest import save_volume
from synpo.evaluate import dataset_names, find_pairs
from test_instruments import _load_script


def _pair(folder, n, image_ext=".nii.gz", label_ext=".nii.gz", label=True):
    os.makedirs(folder, exist_ok=True)
    a = np.zeros((3, 4, 4), np.float32)
    save_volume(a, os.path.join(folder, "image_%s%s" % (n, image_ext)))
    if label:
        save_volume(a.astype(np.uint8), os.path.join(folder, "label_%s%s" % (n, label_ext)))


def test_find_pairs_folder_named_image_and_mixed_extensions(tmp_path):
    """A folder whose path holds "image_" found no pair at all (the whole path was renamed to find the
    label); a label stored uncompressed beside a compressed image was left out silently."""
    folder = str(tmp_path / "image_sets" / "cmr")
    _pair(folder, "007")
    _pair(folder, "21", ".nii.gz", ".nii")
    _pair(folder, "3", ".nii", ".nii")
    _pair(folder, "9", label=False)
    said = []
    pairs = find_pairs(folder, warn=said.append)
    names = [(os.path.basename(i), os.path.basename(l)) for i, l in pairs]
    assert names == [("image_007.nii.gz", "label_007.nii.gz"), ("image_21.nii.gz", "label_21.nii"),
                     ("image_3.nii", "label_3.nii")]
    assert len(said) == 1 and "image_9.nii.gz" in said[0] and "label_9" in said[0]


def test_dataset_names_unique():
    """Two data folders of one name (or one folder twice) were merged or overwritten in the benchmarks'
    tables, keyed by the folder's name."""
    assert dataset_names(["../shared/data/chaos_t2", "x/cmr_bssfp/"]) == ["chaos_t2", "cmr_bssfp"]
    assert dataset_names(["/a/data", "/b/data", "/c/other"]) == ["a/data", "b/data", "other"]
    assert dataset_names(["/a/x", "/a/x/"]) == ["x", "x#2"]


def test_ends_report_counts_organs_per_data_set(capsys):
    """walk_decisions --ends' "all" line counted image_1's label 1 of two data sets as one organ."""
    wd = _load_script("walk_decisions")
    row = {"label": 1, "error": 0, "stopped_by": "volume end", "margins": {}, "volume": "image_1"}
    rows = [dict(row, dataset="chaos"), dict(row, dataset="acdc")]
    assert wd.ends_report(rows, "all")["organs"] == 2


def test_evaluate_both_protocols_on_one_volume_refused_before_any_run(tmp_path, monkeypatch, capsys):
    """--protocol both on a folder of one volume ran the whole intra protocol, then failed on the
    cross protocol's 2-volume need and wrote nothing."""
    import synpo.features
    from synpo.cli import main
    _pair(str(tmp_path / "one"), "5")

    def no_models(*a, **k):
        raise AssertionError("models loaded before the refusal")
    monkeypatch.setattr(synpo.features, "load_models", no_models)
    assert main(["evaluate", str(tmp_path / "one"), "--protocol", "both", "-o", str(tmp_path / "out"),
                 "--quiet"]) == 2
    assert "at least 2 volumes" in capsys.readouterr().err


def test_check_data_folders_refuses_before_any_run(tmp_path):
    """out_of_sample / stability / walk_decisions found a folder without volumes only after running the
    folders before it (stability then crashed on an empty summary)."""
    import pytest
    from synpo.errors import SynPoError
    from synpo.evaluate import check_data_folders
    _pair(str(tmp_path / "a"), "1")
    _pair(str(tmp_path / "a"), "2")
    os.makedirs(str(tmp_path / "empty"))
    assert [len(p) for p in check_data_folders([str(tmp_path / "a")], 1).values()] == [1]
    with pytest.raises(SynPoError, match="no image_N/label_N"):
        check_data_folders([str(tmp_path / "a"), str(tmp_path / "empty")])
    with pytest.raises(SynPoError, match="not found"):
        check_data_folders([str(tmp_path / "missing")])


def test_label_of_finds_uncompressed_labels(tmp_path):
    """corrections_why / corrections_table rebuilt a volume's label path as name + ".nii.gz": a data
    folder of .nii files gave "label file not found"."""
    import pytest
    from synpo.errors import InputError
    from synpo.evaluate import label_of
    folder = str(tmp_path / "image_set")
    _pair(folder, "2", ".nii", ".nii")
    _pair(folder, "07", ".nii.gz", ".nii")
    assert label_of(folder, "image_2") == os.path.join(folder, "label_2.nii")
    assert label_of(folder, "image_07") == os.path.join(folder, "label_07.nii")
    with pytest.raises(InputError):
        label_of(folder, "image_7")
