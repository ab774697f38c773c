"""The package itself: import cost, the extension build, doctor, the CLI's error path."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from steplaw.cli import main


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )


def test_importing_steplaw_does_not_import_torch():
    proc = _python("import sys, steplaw; print('torch' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_extension_loads_and_every_op_has_a_cpu_kernel():
    from steplaw import ops

    assert ops.load_extension(), ops.load_error()
    missing = [name for name, has in ops.kernel_table().items() if not has["cpu"]]
    assert not missing, f"ops without a compiled CPU kernel: {missing}"


def _build_expected_cuda() -> bool:
    import torch

    return (
        torch.version.cuda is not None
        and shutil.which("nvcc") is not None
        and os.environ.get("STEPLAW_NO_CUDA", "") not in ("1", "true", "yes", "on")
    )


def test_cuda_kernels_compiled_whenever_nvcc_and_cuda_torch_are_present():
    """CI has nvcc and torch's CUDA build but no GPU: the CUDA kernels must still build."""
    from steplaw import ops

    if not _build_expected_cuda():
        pytest.skip("no nvcc or CPU-only torch: CUDA kernels are not expected")
    assert ops.cuda_compiled()
    missing = [name for name, has in ops.kernel_table().items() if not has["cuda"]]
    assert not missing, f"ops without a compiled CUDA kernel: {missing}"


def test_missing_extension_falls_back_with_one_warning():
    code = (
        "import sys, warnings\n"
        "sys.modules['steplaw._C'] = None  # makes `import steplaw._C` fail\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import steplaw.ops\n"
        "    import steplaw.ops as again\n"
        "msgs = [str(w.message) for w in caught if 'steplaw' in str(w.message)]\n"
        "print(len(msgs)); print(msgs[0] if msgs else '')\n"
        "print(steplaw.ops.load_extension())\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    count, message, loaded = proc.stdout.strip().splitlines()[:3]
    from steplaw import ops

    if ops.OP_NAMES:
        assert count == "1"
        assert "reference" in message
        for name in ops.OP_NAMES:
            assert name in message
    assert loaded == "False"


def test_doctor_json_reports_versions_and_ops(capsys):
    assert main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    import torch

    assert info["torch"] == torch.__version__
    assert info["extension_loaded"] is True
    assert set(info["ops"]) == set(__import__("steplaw.ops", fromlist=["OP_NAMES"]).OP_NAMES)


def test_doctor_text(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "extension steplaw._C: loaded" in out
    assert "GPU visible" in out


def test_cli_without_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_cli_entry_point_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "steplaw", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.startswith("steplaw ")
