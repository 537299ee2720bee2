"""muvi.eval.table: the report's JSON (clean, sorted, byte-stable) and its printed table."""
import json
import math

import numpy as np
import pytest

from muvi.eval.table import METRIC_INFO, _clean, format_table, write_report


def test_clean_makes_plain_json_values():
    out = _clean({"a": np.float32(1 / 3), "b": [np.int64(2), (math.nan, math.inf)], 3: np.bool_(True)})
    assert out == {"a": 0.33333334, "b": [2, [None, None]], "3": True}
    with pytest.raises(TypeError, match="cannot put object"):
        _clean({"x": object()})


def test_report_file_is_sorted_and_byte_stable(tmp_path):
    report = {"metrics": {"bhs": {"value": 1 / 7, "ci95": [0.1, 0.2], "n": 3, "unit": "percent"}}, "z": 1}
    a, b = write_report(report, tmp_path / "a.json"), write_report(dict(reversed(report.items())), tmp_path / "b.json")
    assert a.read_bytes() == b.read_bytes()
    assert json.loads(a.read_text())["metrics"]["bhs"]["value"] == float(f"{1 / 7:.8g}")
    assert sorted(tmp_path.iterdir()) == [a, b]  # no temporary file left


def test_table_lists_metrics_and_unavailable_ones():
    report = {"metrics": {"bhs": {"value": 42.0, "ci95": [40.0, None], "n": 5, "unit": "percent"}},
              "unavailable": {"fad_vggish": "no --vggish weights"}}
    lines = format_table(report).splitlines()
    assert lines[0].split()[:2] == ["metric", "value"]
    assert lines[1].split()[:3] == ["bhs", "42", "[40,"] and "n/a]" in lines[1] and lines[1].endswith("percent")
    assert lines[2].split()[:2] == ["fad_vggish", "n/a"] and lines[2].endswith("no --vggish weights")
    assert all(len(v) == 3 and isinstance(v[2], str) for v in METRIC_INFO.values())
