import json

import pytest

from steplaw.cli import main
from steplaw.errors import UserError
from steplaw.units import parse_count

BASE = ["train", "--params", "100k", "--tokens", "16384", "--lr", "3e-3", "--batch-tokens", "2048",
        "--device", "cpu", "--optimizer", "torch"]


@pytest.mark.parametrize("text,value", [("2M", 2_000_000), ("1e9", 10**9), ("32768", 32768), ("1.5k", 1500),
                                        ("20m", 20_000_000), ("3B", 3 * 10**9), ("2.5e6", 2_500_000)])
def test_parse_count(text, value):
    assert parse_count(text, integer=True) == value


@pytest.mark.parametrize("text", ["two", "1.5", "-3M", "0", "1e-3", "2X", ""])
def test_parse_count_refuses(text):
    with pytest.raises(UserError, match="--params"):
        parse_count(text, "--params", integer=True)


def test_train_json(tmp_path, capsys):
    assert main(BASE + ["--json", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    for key in ("status", "final_train_loss", "final_val_loss", "params_non_embedding", "params_active", "tokens", "tokens_per_s"):
        assert key in result
    assert result["status"] == "ok" and result["tokens"] == 16384
    assert json.loads((tmp_path / "result.json").read_text())["run_id"] == result["run_id"]
    assert "tok/s" in captured.err and "ETA" in captured.err


def test_train_moe_json(capsys):
    pytest.importorskip("steplaw.models.moe")
    assert main(BASE + ["--moe-experts", "4", "--moe-topk", "2", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "ok"
    assert result["params_active"] < result["params_non_embedding"]
    assert result["config"]["model"]["moe"]["n_experts"] == 4


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--batch-tokens", "1000"], "batch_tokens=1000 is not a multiple of seq_len=128"),
        (["--lr", "fast"], "argument --lr: 'fast' is not a number"),
        (["--tokens", "lots"], "argument --tokens: 'lots' is not a number"),
        (["--moe-experts", "2", "--moe-topk", "3"], "top-k"),
        (["--params-active"], "--params-active"),
    ],
)
def test_train_user_errors_are_one_line(capsys, extra, message):
    assert main(BASE + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_train_on_prepared_data(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("And it came to pass in those days. " * 3000)
    assert main(["data", "prepare", str(text), "-o", str(tmp_path / "tok")]) == 0
    capsys.readouterr()
    args = ["train", "--params", "100k", "--tokens", "4096", "--lr", "3e-3", "--batch-tokens", "1024", "--seq-len", "64",
            "--device", "cpu", "--optimizer", "torch", "--data", str(tmp_path / "tok"), "--json", "--quiet"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "ok" and result["config"]["data"] == str(tmp_path / "tok")


def test_configs_recipe_and_parsers_do_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, argparse; import steplaw.cli.train as t, steplaw.cli.data as d; "
        "import steplaw.train.config, steplaw.models.recipe, steplaw.models.accounting; "
        "from steplaw.train import RunConfig; from steplaw.models import model_for_params; model_for_params(3e6); "
        "p = argparse.ArgumentParser().add_subparsers(); t.add_commands(p); d.add_commands(p); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
