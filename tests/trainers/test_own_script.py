"""examples/own_script/train.py (a PyTorch script that knows nothing of steplaw) through
--trainer-cmd: an adaptive sweep of 4 cells, then fit and report read its runs as any. Most of its time
is the script's own `import torch`, once per run (8 runs)."""
import json
import sys
from pathlib import Path

import pytest

from steplaw.cli import main

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "examples" / "own_script" / "train.py"
TEMPLATE = (f"{sys.executable} {SCRIPT} --lr {{lr}} --batch-seqs {{batch_seqs}} --seq-len {{seq_len}} --tokens {{D}} "
            "--width {args} --seed {seed} --out {run_dir}")


@pytest.mark.slow  # ~15 s on 2 idle cores; over a minute when the cores are busy (torch's import per run)
def test_adaptive_sweep_of_own_script_then_fit_and_report(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", str(ROOT / "examples" / "own_script" / "sweep.toml"), "--out", str(out), "--planner", "adaptive",
                 "--total-budget", "8", "--workers", "2", "--threads-per-worker", "1", "--quiet", "--trainer-cmd", TEMPLATE])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["runs", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    cells = {(r["N"], r["D"]) for r in rows if r["status"] == "ok"}
    assert len(cells) == 4 and {r["trainer"] for r in rows} == {"command"}
    assert all(r["loss"] > 0 and r["seq_len"] == 32 and r["batch_tokens"] % 32 == 0 for r in rows if r["status"] == "ok")
    assert main(["fit", str(out), "--json", "--no-plots"]) == 0
    fit = json.loads(capsys.readouterr().out)
    assert len(fit["cells"]) == 4
    assert main(["report", str(out)]) == 0
    assert (out / "report" / "report.md").is_file()
