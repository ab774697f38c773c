"""Laws know their schedule (issue 22 item 7): every published law names the LR schedule it
was fitted under, `fit` records the runs' schedule in its law file and refuses a mixture
(unless --allow-mixed-schedules), and `predict` / `plan` warn when --schedule differs."""
import json
import math

import numpy as np

from steplaw.cli import main
from steplaw.laws.published import LAWS
from steplaw.laws.schedules import KINDS, UNKNOWN, kind_of, label_of_config

N_VALUES, D_VALUES = (6e7, 2.4e8, 9.6e8), (2e9, 8e9, 3.2e10)


def _table(path, schedules=lambda i: "cosine"):
    rows = []
    for n in N_VALUES:
        for d in D_VALUES:
            lr_star, bs_star = 0.3 * n**-0.25 * d**0.1 / 40, 2e5 * (d / 2e9) ** 0.3
            for lr in np.geomspace(1e-4, 1.6e-3, 5).tolist():
                for bs in (2**17, 2**18, 2**19, 2**20):
                    loss = 1.7 + 400 / n**0.34 + 410 / d**0.28 + 0.02 * math.log(lr / lr_star) ** 2 \
                        + 0.01 * math.log(bs / bs_star) ** 2
                    rows.append(f"{n!r},{d!r},{lr!r},{bs},{loss!r},{schedules(len(rows))}")
    path.write_text("N,D,lr,batch_tokens,loss,schedule\n" + "\n".join(rows) + "\n")
    return path


def test_every_published_law_names_its_schedule():
    for key, law in LAWS.items():
        assert law.schedule_kind in KINDS + (UNKNOWN,), key
        assert law.info()["schedule_kind"] == law.schedule_kind
    assert LAWS["step_law"].schedule_kind == "cosine" and "1e-5" in LAWS["step_law"].schedule
    assert LAWS["deepseek"].schedule_kind == "multistep"


def test_labels_of_configs_and_their_kinds():
    assert label_of_config({"schedule": "cosine", "min_lr_ratio": 0.1}) == "cosine(min_lr_ratio=0.1)"
    label = label_of_config({"schedule": "wsd", "min_lr_ratio": 0.0, "decay_fraction": 0.2, "decay_shape": "sqrt"})
    assert label == "wsd(decay_fraction=0.2,decay_shape=sqrt,min_lr_ratio=0)" and kind_of(label) == "wsd"
    assert label_of_config({"lr": 1e-3}) is None and kind_of(None) == UNKNOWN


def test_fit_records_the_schedule_and_predict_warns_on_another(tmp_path, capsys):
    law = tmp_path / "law.json"
    assert main(["fit", str(_table(tmp_path / "t.csv", lambda i: "wsd")), "--n-boot", "20", "--json",
                 "--save", str(law)]) == 0
    assert json.loads(capsys.readouterr().out)["schedule"] == "wsd"
    assert json.loads(law.read_text())["schedule"] == "wsd"
    args = ["predict", "--params", "2.4e8", "--tokens", "8e9", "--law", str(law)]
    assert main(args + ["--schedule", "cosine", "--json"]) == 0
    captured = capsys.readouterr()
    assert "was fitted under a wsd schedule, not cosine" in captured.err
    assert json.loads(captured.out)["predictions"][0]["schedule"] == "wsd"
    assert main(args + ["--schedule", "wsd"]) == 0
    assert "schedule" not in capsys.readouterr().err
    assert main(["plan", "--params", "2.4e8", "--tokens", "8e9", "--hparam-law", str(law), "--schedule", "cosine",
                 "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["schedule_kind"] == "wsd" and "not cosine" in captured.err


def test_published_laws_warn_when_the_schedule_differs(capsys):
    assert main(["predict", "--params", "1e9", "--tokens", "1e11", "--law", "step_law", "--schedule", "wsd"]) == 0
    err = capsys.readouterr().err
    assert "fitted under a cosine schedule, not wsd" in err and "2405.18392" in err
    assert main(["predict", "--params", "1e9", "--tokens", "1e11", "--law", "step_law", "--schedule", "cosine"]) == 0
    assert "schedule" not in capsys.readouterr().err
    assert main(["plan", "--compute", "1e21", "--schedule", "wsd", "--json"]) == 0
    captured = capsys.readouterr()
    assert "not wsd" in captured.err and json.loads(captured.out)["planned_schedule"] == "wsd"
    assert main(["predict", "--params", "1e9", "--tokens", "1e11", "--schedule", "triangle"]) == 2
    err = capsys.readouterr().err
    assert "--schedule 'triangle' is not a schedule steplaw knows" in err and "Traceback" not in err


def test_mixed_schedules_are_refused_unless_allowed(tmp_path, capsys):
    path = _table(tmp_path / "mixed.csv", lambda i: "cosine" if i % 2 else "wsd")
    assert main(["fit", str(path), "--n-boot", "20", "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained under 2 LR schedules (cosine: 90 runs, wsd: 90 runs)" in err
    assert "--allow-mixed-schedules" in err
    assert main(["fit", str(path), "--n-boot", "20", "--json", "--allow-mixed-schedules"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["schedule"] == "cosine + wsd" and "fitted to runs of 2 LR schedules" in captured.err


def test_a_table_without_schedules_gives_an_unknown_one(tmp_path, capsys):
    path = _table(tmp_path / "t.csv")
    path.write_text("\n".join(line.rsplit(",", 1)[0] for line in path.read_text().splitlines()) + "\n")
    law = tmp_path / "law.json"
    assert main(["fit", str(path), "--n-boot", "0", "--json", "--save", str(law)]) == 0
    assert json.loads(capsys.readouterr().out)["schedule"] == "unknown"
    assert main(["predict", "--params", "2.4e8", "--tokens", "8e9", "--law", str(law), "--schedule", "wsd"]) == 0
    assert "does not say which LR schedule it was fitted under" in capsys.readouterr().err


def test_a_sweep_directory_gives_its_runs_schedule(tmp_path, capsys):
    from steplaw.models.accounting import param_counts
    from steplaw.models.config import ModelConfig
    from steplaw.sweep.store import ResultStore
    from steplaw.train.config import RunConfig

    sweep = tmp_path / "sweep"
    with ResultStore(sweep) as store:
        entries, counts = [], []
        for d_model in (32, 64, 128):
            model = ModelConfig(d_model=d_model, n_layers=2, n_heads=2, d_ff=2 * d_model, max_seq_len=64)
            for d in (2**16, 2**18, 2**20):
                for lr in (0.001, 0.002, 0.004, 0.008):
                    for bs in (128, 256):
                        config = RunConfig(model=model, tokens=d, lr=lr, batch_tokens=bs, seq_len=64, schedule="wsd",
                                           decay_shape="sqrt", min_lr_ratio=0.0)
                        entries.append({**config.to_dict(), "run_id": config.run_id()})
                        p = param_counts(model)
                        counts.append({"non_embedding": p.non_embedding, "active": p.active, "total": p.total})
        store.add_runs(entries, counts)
        for entry, count in zip(entries, counts):
            loss = 3.0 + 0.1 * np.log(entry["lr"] / 0.003) ** 2 + 10 / entry["tokens"] ** 0.3 \
                + 20 / count["non_embedding"] ** 0.3 + 0.01 * np.log(entry["batch_tokens"] / 180) ** 2
            store.record_result(entry["run_id"], {"status": "ok", "final_train_loss": loss, "compute_flops": 1e12},
                                host="test")
    assert main(["fit", str(sweep), "--n-boot", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["schedule"] == "wsd(decay_fraction=0.2,decay_shape=sqrt,min_lr_ratio=0)"
