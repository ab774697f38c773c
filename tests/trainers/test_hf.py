"""--trainer hf (steplaw/trainers/hf.py): a tiny Llama through the whole sweep -> fit ->
report path, the contract's result fields, seed determinism, bad model args, a missing
transformers, and WSD branches (run_trunk) equal to the same runs trained alone, resumed
after an interruption without retraining a finished branch."""
import json
import sys

import pytest

pytest.importorskip("transformers")

from steplaw.cli import main
from steplaw.errors import UserError
from steplaw.trainers.hf import HFTrainer, count_params
from steplaw.trial import Trial

ARGS = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2}
SEQ = 16
SETTINGS = {"eval_tokens": 256}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one torch thread is faster than two on 2 busy cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trial(D=1024, **kw):
    base = dict(model="h16", N=count_params(ARGS, seq_len=SEQ), D=D, lr=3e-3, batch_tokens=64, seq_len=SEQ, args=ARGS,
                trainer="hf", warmup_tokens=128, schedule="wsd", decay_fraction=0.25, settings=SETTINGS)
    return Trial(**{**base, **kw})


SPEC = f"""
tokens = [1024, 2048]
[fixed]
seq_len = {SEQ}
eval_tokens = 256
[[models]]
name = "h8"
params = {{N8}}
args = {{{{ hidden_size = 8, intermediate_size = 16, num_hidden_layers = 1, num_attention_heads = 2 }}}}
[[models]]
name = "h16"
params = {{N16}}
args = {{{{ hidden_size = 16, intermediate_size = 32, num_hidden_layers = 1, num_attention_heads = 2 }}}}
"""


@pytest.mark.slow  # ~32 s on 2 idle cores: the spawned worker's import of torch + transformers, and 8 runs
def test_adaptive_sweep_through_hf_then_fit_and_report(tmp_path, capsys):
    n8 = count_params({"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}, seq_len=SEQ)
    n16 = count_params({k: ARGS[k] for k in ARGS if k != "num_key_value_heads"}, seq_len=SEQ)
    spec = tmp_path / "hf.toml"
    spec.write_text(SPEC.format(N8=n8, N16=n16))
    out = tmp_path / "sweep"
    code = main(["sweep", str(spec), "--out", str(out), "--planner", "adaptive", "--total-budget", "8", "--workers", "1",
                 "--threads-per-worker", "1", "--quiet", "--trainer", "hf"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["runs", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["N"], r["D"]) for r in rows if r["status"] == "ok"} == {(n, d) for n in (n8, n16) for d in (1024, 2048)}
    assert {r["trainer"] for r in rows} == {"hf"} and all(r["loss"] > 0 for r in rows if r["status"] == "ok")
    assert main(["fit", str(out), "--json", "--no-plots"]) == 0
    assert len(json.loads(capsys.readouterr().out)["cells"]) == 4
    assert main(["report", str(out)]) == 0
    assert (out / "report" / "report.md").is_file()


def test_result_fields_and_same_seed_same_loss():
    reports = []
    first = HFTrainer()(trial(), progress=reports.append)
    again = HFTrainer()(trial())
    other_seed = HFTrainer()(trial(seed=1))
    assert first["status"] == "ok" and first["tokens"] == 1024 and first["steps"] == 16 and first["wall_s"] > 0
    assert 0 < first["final_train_loss"] < 6 and 0 < first["final_val_loss"] < 6 and first["curve"][-1][0] == 1024
    assert reports and reports[-1]["tokens"] == 1024 and reports[-1]["loss"] == first["final_train_loss"]
    assert (again["final_train_loss"], again["final_val_loss"]) == (first["final_train_loss"], first["final_val_loss"])
    assert other_seed["final_train_loss"] != first["final_train_loss"]


@pytest.mark.parametrize("args, params, expected", [
    ({"model_type": "no_such_model"}, None, "args model_type='no_such_model' is not a transformers model type"),
    ({**ARGS, "hidden_sise": 16}, None, "args 'hidden_sise': not a field of transformers' LlamaConfig"),
    (ARGS, 10_000, "gives params=10000 but the model its args build has N="),
    ({"model_type": "vit"}, None, "model_type 'vit' has no causal LM in transformers"),
])
def test_bad_model_args_fail_the_run_in_one_sentence(args, params, expected):
    result = HFTrainer()(trial(args=args, **({"N": params} if params else {})))
    assert result["status"] == "failed" and expected in result["reason"], result
    assert "\n" not in result["reason"]


def test_missing_transformers_is_one_sentence_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    spec = tmp_path / "hf.toml"
    spec.write_text(SPEC.format(N8=1, N16=2))
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--trainer", "hf", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install steplaw[hf]" in err and len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


# -- WSD branches -----------------------------------------------------------------------------

BUDGETS = (1024, 2048, 4096)


@pytest.fixture(scope="module")
def alone():
    return {D: HFTrainer().train(trial(D)) for D in BUDGETS}


def run_trunk(trunk_dir, done=(), stop_after=None):
    got = {}

    def on_result(run_id, result):
        got[run_id] = result
        if stop_after is not None and len(got) == stop_after:
            raise KeyboardInterrupt  # the driver killed after storing this branch

    try:
        HFTrainer().run_trunk([trial(D) for D in reversed(BUDGETS)], str(trunk_dir), set(done), on_result)
    except KeyboardInterrupt:
        pass
    return got


def test_branches_equal_the_runs_alone(tmp_path, alone):
    got = run_trunk(tmp_path / "trunk")
    ids = [trial(D).run_id() for D in BUDGETS]
    assert list(got) == ids  # shortest D first
    for D, run_id in zip(BUDGETS, ids):
        for name in ("loss", "val_loss", "tokens", "steps", "curve"):
            assert got[run_id][name] == alone[D][name], (D, name)
        assert len(got[run_id]["trunk"]) == 16
    assert len({r["trunk"] for r in got.values()}) == 1
    # the longest is charged the stable phase; the sum is what the trunk trained
    steps = {D: D // 64 for D in BUDGETS}
    points = {D: steps[D] - round(0.25 * steps[D]) for D in BUDGETS}
    assert got[ids[-1]]["tokens_trained"] == 4096
    assert sum(r["tokens_trained"] for r in got.values()) == 64 * (points[4096] + sum(steps[D] - points[D] for D in BUDGETS))
    assert len(list((tmp_path / "trunk").glob("trunk-*.pt"))) <= 2


def test_interrupted_trunk_resumes_without_retraining(tmp_path, alone, monkeypatch):
    import steplaw.trainers.hf as hf

    first = run_trunk(tmp_path / "trunk", stop_after=2)  # killed after the second branch
    assert len(first) == 2
    trained = []
    real = hf._train
    monkeypatch.setattr(hf, "_train", lambda setup, state, until, *a, **k: (trained.append((state.step, until)),
                                                                           real(setup, state, until, *a, **k)))
    rest = run_trunk(tmp_path / "trunk", done={trial(1024).run_id()})
    # branch 2's result was written before the kill: delivered, not retrained; branch 1 is done
    assert list(rest) == [trial(2048).run_id(), trial(4096).run_id()]
    assert rest[trial(4096).run_id()]["loss"] == alone[4096]["loss"]
    assert rest[trial(2048).run_id()]["loss"] == alone[2048]["loss"]
    assert trained[0][:2] == (24, 48)  # the trunk resumed at 2048's checkpoint (its branch point), not at step 0


@pytest.mark.parametrize("change, expected", [
    ({"decay_fraction": 1.0}, "decay_fraction=1.0: a branching WSD run needs a cooldown fraction in (0, 1)"),
    ({"warmup_tokens": 0}, "warmup_tokens is not set"),
    ({"warmup_tokens": 1024}, "inside its warmup of 16 steps"),
    ({"schedule": "cosine"}, "only 'wsd' runs branch off a trunk"),
])
def test_bad_trunk_input_is_refused_before_training(tmp_path, change, expected):
    with pytest.raises(UserError, match=None) as info:
        HFTrainer().run_trunk([trial(D, **change) for D in BUDGETS], str(tmp_path / "t"), set(), lambda *a: None)
    assert expected in str(info.value) and not (tmp_path / "t").exists()


def test_trunk_of_bad_params_fails_each_branch_and_a_full_disk_is_refused(tmp_path, monkeypatch):
    got = {}
    HFTrainer().run_trunk([trial(D, N=10) for D in BUDGETS], str(tmp_path / "t"), set(), got.__setitem__)
    assert len(got) == 3 and all(r["status"] == "failed" and "gives params=10" in r["reason"] for r in got.values())
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(UserError, match="needs .* GB for its 2 checkpoints"):
        HFTrainer().run_trunk([trial(D) for D in BUDGETS], str(tmp_path / "u"), set(), got.__setitem__)
    assert not list((tmp_path / "u").glob("*.pt"))
