"""Real data nobody on the project wrote: scikit-learn's bundled handwritten digits,
exported to CSV by scripts/export_digits.py and trained from the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipelines.cli_util import table_data, zerotrain

pytest.importorskip("sklearn")

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"


def test_mlp_classifier_on_the_exported_digits_csv_reaches_95_percent_held_out(tmp_path):
    csv_path = tmp_path / "digits.csv"
    subprocess.run([sys.executable, str(SCRIPTS / "export_digits.py"), str(csv_path)], check=True)
    header = csv_path.read_text().splitlines()[0].split(",")
    assert len(header) == 65 and header[-1] == "label"
    run_dir = tmp_path / "run"
    data = table_data(csv_path, tmp_path / "cache")
    proc = zerotrain("run", "mlp_classifier", *data, "--run-dir", str(run_dir), timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval"]["accuracy"] >= 0.95, summary["eval"]
    record = json.loads((run_dir / "data.json").read_text())["meta"]
    assert record["classes"] == list(range(10)) and record["n_features"] == 64
    assert record["files"][0]["size"] == csv_path.stat().st_size
