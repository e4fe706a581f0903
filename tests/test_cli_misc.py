"""Issue 10 #13 and the CLI's last line of defence: --version, a closed stdout, progress while verifying, the
labelled import-peft report, and internal errors without a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import lragent
from lragent.cli import main
from lragent.cli.bundle import report_lines
from test_bundle import synth_bundle
from test_bundle_helpers import make_run_dir, run_cli

REPO = Path(__file__).resolve().parents[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"lragent {lragent.__version__}"


def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path):
    from lragent.bundle import write_bundle
    b = write_bundle(synth_bundle(), tmp_path / "b")
    code = f"import sys; from lragent.cli import main; sys.exit(main(['inspect', {str(b)!r}]))"
    out = subprocess.run(f"{sys.executable} -c \"{code}\" | head -c 10", shell=True, capture_output=True, text=True,
                         timeout=120, cwd=REPO, executable="/bin/bash")
    assert out.stdout == "bundle    " and out.stderr == "", out.stderr


def test_broken_pipe_in_process(tmp_path, monkeypatch, capsys):
    from lragent.bundle import write_bundle
    b = write_bundle(synth_bundle(), tmp_path / "b")

    class Closed:
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Closed())
    rc = main(["inspect", str(b)])
    monkeypatch.undo()
    assert rc == 141 and capsys.readouterr().err == ""


def test_internal_error_is_one_line_without_traceback(tmp_path, monkeypatch, capsys):
    from lragent.cli import bundle as cli_bundle
    monkeypatch.delenv("LRAGENT_DEBUG", raising=False)
    monkeypatch.setattr(cli_bundle, "summary", lambda *a: {}["boom"])
    rc = main(["inspect", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: internal error (KeyError: 'boom')")
    assert "Traceback" not in err


def test_export_says_what_it_verifies(tiny_base, tmp_path, capsys):
    make_run_dir(tmp_path / "run", tiny_base, roles=("planner", "actor"), steps=(1,), rank=2)
    capsys.readouterr()                                                  # the fixture's own HF progress bars
    rc, out, err = run_cli(["export", "--run", tmp_path / "run", "--out", tmp_path / "b"], capsys)
    assert rc == 0, err
    assert err.startswith("verifying: loading each peft/<role> (planner, actor) with PEFT") and err.count("\n") == 1
    assert out.startswith(f"wrote {tmp_path / 'b'}")


@pytest.mark.parametrize("device", ["foo", "cuda:7"])
def test_export_device_is_checked_first(tiny_base, tmp_path, capsys, device):
    make_run_dir(tmp_path / "run", tiny_base, roles=("planner",), steps=(1,), rank=2)
    capsys.readouterr()
    rc, _, err = run_cli(["export", "--run", tmp_path / "run", "--out", tmp_path / "b", "--device", device], capsys)
    assert rc == 2 and err.startswith("error: --device ") and device in err and err.count("\n") == 1
    assert not (tmp_path / "b").exists()


def test_import_report_labels_its_columns():
    rep = {"roles": {"planner": {"max_abs_err": 0.0, "rel_max_err": 0.0, "rel_err_shared": 0.14}},
           "peft_logit_err": {"planner": 1e-7}, "exact_modules": 0, "shared_modules": 4}
    header, scope, row = report_lines(rep)
    assert "abs max|dW err|" in header and "rel max|dW err|" in header and "rel ||dW err||_F" in header
    assert scope.count("(exact: 0 mod)") == 2 and "(shared A: 4 mod)" in scope and "(PEFT vs bundle)" in scope
    cells = row.split()
    assert cells[:3] == ["planner", "-", "-"] and cells[3] == "1.40e-01"      # no 0.00e+00 beside 14%


def test_sigterm_during_export_leaves_nothing(tiny_base, tmp_path, monkeypatch, capsys):
    import os
    import signal
    from lragent.train import export

    make_run_dir(tmp_path / "run", tiny_base, roles=("planner",), steps=(1,), rank=2)
    capsys.readouterr()
    monkeypatch.setattr(export, "verify_peft", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    out = tmp_path / "out" / "b"
    rc = main(["export", "--run", str(tmp_path / "run"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 143 and "error: terminated (SIGTERM)" in err and not (tmp_path / "out").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _truncated_copy(base, dst):
    import shutil
    shutil.copytree(base, dst)
    w = dst / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size - 1000])
    return dst


def test_truncated_base_at_export_and_import_is_one_line(tiny_base, tmp_path, capsys):
    trunc = _truncated_copy(tiny_base, tmp_path / "trunc")
    make_run_dir(tmp_path / "run", tiny_base, roles=("planner",), steps=(1,), rank=2)
    capsys.readouterr()
    for argv in (["export", "--run", tmp_path / "run", "--out", tmp_path / "o" / "b", "--base", trunc],
                 ["import-peft", "--base", trunc, "--role", f"planner={tmp_path}", "--out", tmp_path / "o" / "b"]):
        rc, _, err = run_cli(argv, capsys)
        assert rc == 2 and err.count("\n") == 1 and "model.safetensors is damaged or truncated" in err, err
    assert not (tmp_path / "o").exists()


def test_long_role_name_at_import_is_one_line(tiny_base, tmp_path, capsys):
    rc, _, err = run_cli(["import-peft", "--base", tiny_base, "--role", f"{'a' * 300}={tmp_path}",
                          "--out", tmp_path / "b"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "at most 64 characters" in err
