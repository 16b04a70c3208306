"""The thresholds file (``custom.thresholds_file``): box and decision thresholds with the settings they hold
for; round trip, defaults, errors naming the file, and the deprecated names of bundle 0.1.0."""

from __future__ import annotations

import json
import shutil

import pytest

from custom.labels import CLASS_NAMES
from custom.thresholds_file import Thresholds, load_thresholds, output_path, save_thresholds


def test_round_trip_defaults_and_errors(tmp_path, caplog):
    calibration = Thresholds(
        box_thresholds={"mix": {"Cardiomegaly": 0.75}},
        decision_thresholds={"image": {"Mass": 0.3}},
        component="max",
        details={"note": [1, 2]},
    )
    path = save_thresholds(calibration, tmp_path / "thresholds.json")
    loaded = load_thresholds(path)
    assert loaded.source == str(path) and loaded.component == "max" and loaded.details == {"note": [1, 2]}
    boxes = loaded.box_threshold_vector("mix")
    assert boxes[CLASS_NAMES.index("Cardiomegaly")] == 0.75 and boxes[0] == 0.9  # the default elsewhere
    assert (
        loaded.box_threshold_sources("mix")[1] == "two_fold"
        and loaded.box_threshold_sources("mix")[0] == "default"
    )
    assert loaded.decision_threshold_vector("image")[CLASS_NAMES.index("Mass")] == 0.3
    assert loaded.decision_threshold_vector("combined")[0] == 0.5

    with caplog.at_level("WARNING"):
        defaults = load_thresholds(tmp_path / "absent.json", component="union")
    assert defaults.source is None and defaults.component == "union" and "no thresholds file" in caplog.text
    with pytest.raises(FileNotFoundError):
        load_thresholds(tmp_path / "absent.json", required=True)

    content = json.loads(path.read_text())
    content["inference_box_thresholds"]["mix"]["Flu"] = 0.5
    (tmp_path / "unknown.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match="unknown.json.*unknown classes"):
        load_thresholds(tmp_path / "unknown.json")
    content["inference_box_thresholds"]["mix"] = {"Mass": 1.5}
    (tmp_path / "range.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match="range.json.*\\[0, 1\\]"):
        load_thresholds(tmp_path / "range.json")
    with pytest.raises(ValueError, match="normalize must be true or false"):
        Thresholds(normalize="false")  # a command-line string would be truthy
    with pytest.raises(ValueError, match="sharpness must be a positive number"):
        Thresholds(weighting="softmax", sharpness=0)
    softmax = load_thresholds(save_thresholds(Thresholds(weighting="softmax", sharpness=50.0),
                                                tmp_path / "softmax.json"))
    assert (softmax.weighting, softmax.sharpness) == ("softmax", 50.0)
    # A file written before the softmax weighting has no sharpness: it reads as 1 (unused by sigmoid / raw).
    del content["maps"]["sharpness"]
    content["inference_box_thresholds"]["mix"] = {}
    (tmp_path / "before.json").write_text(json.dumps(content))
    assert load_thresholds(tmp_path / "before.json").sharpness == 1.0
    (tmp_path / "old.json").write_text(json.dumps({"format_version": 0}))
    with pytest.raises(ValueError, match="old.json.*format_version"):
        load_thresholds(tmp_path / "old.json")


def test_the_deprecated_names_are_still_read_with_a_warning(tmp_path, caplog):
    old = save_thresholds(Thresholds(component="max"), tmp_path / "calibration.json")
    with pytest.warns(DeprecationWarning, match="calibration.json"):
        beside = load_thresholds(tmp_path / "thresholds.json")  # missing: the old name beside it is read
    assert beside.source == str(old) and beside.component == "max"
    shutil.copy(old, tmp_path / "elsewhere.json")
    with pytest.warns(DeprecationWarning, match="calibration_file"):
        chosen = load_thresholds(tmp_path / "thresholds.json", deprecated_path=tmp_path / "elsewhere.json")
    assert chosen.source == str(tmp_path / "elsewhere.json")
    assert output_path(tmp_path) == str(tmp_path / "thresholds.json")
    with pytest.warns(DeprecationWarning):
        assert output_path(tmp_path, "x/calibration.json") == "x/calibration.json"


def test_deprecated_defaults_still_apply_with_a_warning(tmp_path):
    with pytest.warns(DeprecationWarning, match="calibration_defaults"):
        loaded = load_thresholds(tmp_path / "absent.json", deprecated_defaults={"weighting": "sigmoid"},
                                 weighting="softmax", sharpness=5.0)
    assert (loaded.weighting, loaded.sharpness) == ("sigmoid", 5.0)
