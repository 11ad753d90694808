"""`python -m equivcheck onnx MODEL.onnx --torch ... [--jax ...]`: an exported file checked outside pytest.

Exit 0 on a correct export (two-way and three-way), 1 naming the side off (a file exported from other
weights: onnx; a wrong port: jax), 2 with one line naming the file, torch or jax on bad input. The
models are built here and exported with equivcheck.onnx's exporter; CPU only.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="pip install equivcheck[onnx]")
pytest.importorskip("onnxscript", reason="pip install equivcheck[onnx]")

import torch

from equivcheck.__main__ import main
from equivcheck.onnx import export_model

HERE = f"{__name__}"  # the module path the factories are imported by (tests.test_cli_onnx under pytest)


class Tiny(torch.nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(width, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x, y):
        return self.fc(x) + self.fc(y)


class TwoOutputs(Tiny):
    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.tanh(h)), h


def make_model():
    torch.manual_seed(0)
    return Tiny()


def make_other():
    torch.manual_seed(1)  # the same architecture, another checkpoint
    return Tiny()


def make_wide():
    return Tiny(width=5)


def make_two_inputs():
    return TwoInputs()


def make_two_outputs():
    torch.manual_seed(0)
    return TwoOutputs()


def not_a_module():
    return [1, 2, 3]


def _params():
    return {k: v.detach().numpy() for k, v in make_model().state_dict().items()}


def apply(x):
    import jax.numpy as jnp

    p = _params()
    h = jnp.tanh(x @ p["fc1.weight"].T + p["fc1.bias"])
    return h @ p["fc2.weight"].T + p["fc2.bias"]


def wrong_apply(x):
    import jax.numpy as jnp

    p = _params()
    h = jnp.maximum(x @ p["fc1.weight"].T + p["fc1.bias"], 0)  # relu for tanh: the porting slip
    return h @ p["fc2.weight"].T + p["fc2.bias"]


def misshapen_apply(x):
    return np.asarray(apply(x))[:, :2]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, make in (("good", make_model), ("other", make_other), ("two_outputs", make_two_outputs)):
        out[name] = export_model(make(), (torch.randn(3, 4),), str(d), name).path
    # as exported elsewhere: torch.onnx.export with Dim.AUTO past the batch leaves the Linear's width
    # symbolic (s27 under torch 2.14); equivcheck's own export pins it
    out["symbolic"] = str(d / "symbolic.onnx")
    dyn = ({0: torch.export.Dim("batch"), 1: torch.export.Dim.AUTO},)
    torch.onnx.export(make_model().eval(), (torch.randn(3, 4),), out["symbolic"], dynamo=True, dynamic_shapes=dyn,
                      verbose=False)
    # the batch fixed at export (no dynamic_shapes): x[3, 4]
    out["fixed_batch"] = str(d / "fixed_batch.onnx")
    torch.onnx.export(make_model().eval(), (torch.randn(3, 4),), out["fixed_batch"], dynamo=True, verbose=False)
    (d / "garbage.onnx").write_bytes(b"not a protobuf at all")
    out["garbage"] = str(d / "garbage.onnx")
    return out


def cli(capsys, *argv, dim=("--dim", "x:1=4")):
    # --dim on a pinned dimension is harmless; it fixes one a file from elsewhere left symbolic; a later
    # --examples wins
    code = main(["onnx", "--examples", "3", *dim, *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def bad(capsys, *argv, **kw):
    code, _, err = cli(capsys, *argv, **kw)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("equivcheck onnx: "), err
    return err


def test_a_correct_export_agrees_two_way(files, capsys):
    code, out, err = cli(capsys, files["good"], "--torch", f"{HERE}:make_model")
    assert code == 0, out + err
    assert "opset" in out and out.count("example ") == 3
    assert out.strip().splitlines()[-1].startswith("all agree: 3 examples, torch-onnx within rtol=")


def test_a_correct_export_agrees_three_way_with_a_file_factory(files, capsys):
    code, out, err = cli(capsys, files["good"], "--torch", f"{Path(__file__)}:make_model", "--jax", f"{HERE}:apply",
                         "--batch", "5", "--seed", "7")
    assert code == 0, out + err
    assert "float32[5, 4]" in out
    assert "torch-onnx" in out and "torch-jax" in out and "onnx-jax" in out


def test_a_file_of_other_weights_is_onnx_off(files, capsys):
    code, out, _ = cli(capsys, files["other"], "--torch", f"{HERE}:make_model")
    assert code == 1
    assert out.strip().splitlines()[-1].startswith("onnx is off: example 1: torch vs onnx: "), out


def test_a_file_of_other_weights_is_onnx_off_three_way(files, capsys):
    code, out, _ = cli(capsys, files["other"], "--torch", f"{HERE}:make_model", "--jax", f"{HERE}:apply")
    assert code == 1
    assert "onnx is off" in out and "onnx disagrees with both others" in out, out


def test_a_wrong_port_is_jax_off(files, capsys):
    code, out, _ = cli(capsys, files["good"], "--torch", f"{HERE}:make_model", "--jax", f"{HERE}:wrong_apply")
    assert code == 1
    last = out.strip().splitlines()[-1]
    assert last.startswith("jax is off: ") and "jax disagrees with both others" in last, out


def test_a_missing_file(tmp_path, capsys):
    err = bad(capsys, tmp_path / "nope.onnx", "--torch", f"{HERE}:make_model")
    assert "nope.onnx: the ONNX file does not exist" in err


def test_a_file_that_does_not_load(files, capsys):
    err = bad(capsys, files["garbage"], "--torch", f"{HERE}:make_model")
    assert "the ONNX file" in err and "garbage.onnx does not load" in err


@pytest.mark.parametrize("spec, words", [
    ("no_such_module_xyz:make", "--torch no_such_module_xyz:make: cannot import no_such_module_xyz: ModuleNotFound"),
    (f"{HERE}:no_such_factory", "has no 'no_such_factory'"),
    ("make_model", "expected module:callable or path/to/file.py:callable"),
    ("/no/such/file.py:make", "/no/such/file.py does not exist"),
    (f"{HERE}:not_a_module", "the factory returned a list, not a torch nn.Module"),
])
def test_a_bad_factory(files, capsys, spec, words):
    err = bad(capsys, files["good"], "--torch", spec)
    assert "--torch" in err and words in err, err


def test_a_bad_jax_apply(files, capsys):
    err = bad(capsys, files["good"], "--torch", f"{HERE}:make_model", "--jax", "no_such_module_xyz:apply")
    assert "--jax no_such_module_xyz:apply: cannot import" in err


def test_a_port_whose_output_does_not_fit(files, capsys):
    err = bad(capsys, files["good"], "--torch", f"{HERE}:make_model", "--jax", f"{HERE}:misshapen_apply")
    assert "--jax" in err and "the port's outputs do not fit the torch model's" in err


def test_a_file_for_another_model_is_the_file_not_fitting_not_the_factory(files, capsys):
    # O11: every dimension past the batch is the graph's own, so torch refusing it is the file's mismatch
    err = bad(capsys, files["good"], "--torch", f"{HERE}:make_wide")
    assert err.startswith(f"equivcheck onnx: {files['good']}: the ONNX file's input x[batch, 4] does not fit the "
                          f"torch model (--torch {HERE}:make_wide raised RuntimeError"), err
    assert err.endswith("a file for another model?") and "the factory raised" not in err, err


def test_a_batch_the_graph_fixes_otherwise_is_refused(files, capsys):
    # O11: it ran at the graph's batch 3 and passed, never saying --batch 5 was not what ran
    err = bad(capsys, files["fixed_batch"], "--torch", f"{HERE}:make_model", "--batch", "5")
    assert err == "equivcheck onnx: --batch 5 refused: x's batch axis is fixed at 3 in the graph", err
    code, out, err = cli(capsys, files["fixed_batch"], "--torch", f"{HERE}:make_model", "--batch", "3")
    assert code == 0 and "float32[3, 4]" in out, out + err


def test_one_example_is_one_example_and_a_verdict_gives_the_values(files, capsys):
    # O12: "all agree: 1 examples"; and a disagreement said only "values differ beyond rtol=...", no figures
    code, out, err = cli(capsys, files["good"], "--torch", f"{HERE}:make_model", "--examples", "1")
    assert code == 0 and out.strip().splitlines()[-1].startswith("all agree: 1 example, "), out + err
    code, out, _ = cli(capsys, files["other"], "--torch", f"{HERE}:make_model")
    last = out.strip().splitlines()[-1]
    assert code == 1 and "values differ beyond" in last, out
    assert "worst at index" in last and "torch " in last and "onnx " in last and "max abs err" in last, last


def test_an_input_count_mismatch(files, capsys):
    err = bad(capsys, files["good"], "--torch", f"{HERE}:make_two_inputs")
    assert "the ONNX file takes 1 inputs ['x'], the torch model's forward 2 (x, y)" in err


def test_an_output_count_mismatch(files, capsys):
    err = bad(capsys, files["two_outputs"], "--torch", f"{HERE}:make_model")
    assert "does not fit the model" in err and "the graph gives 2 outputs" in err


@pytest.mark.parametrize("option, value", [("--examples", "0"), ("--batch", "x")])
def test_a_bad_count(files, capsys, option, value):
    err = bad(capsys, files["good"], "--torch", f"{HERE}:make_model", option, value)
    assert option in err


def test_a_width_left_symbolic_says_to_fix_it_with_dim(files, capsys):
    err = bad(capsys, files["symbolic"], "--torch", f"{HERE}:make_model", dim=())
    assert "--torch" in err and "dynamic dimensions x:1 got drawn sizes: fix them with --dim INPUT:AXIS=SIZE" in err


@pytest.mark.parametrize("value, words", [("x:3=4", "no input 'x' with an axis 3"), ("nope=4", "no dynamic dimension"),
                                          ("x:1=0", "SIZE a positive integer"),
                                          # O11: a size the graph fixes otherwise, later blamed on torch
                                          ("x:1=5", ": x axis 1 is fixed at 4 in the graph"),
                                          # O12: it said "no dynamic dimension 'x:a'"
                                          ("x:a=4", "the axis 'a' of input 'x' must be an integer")])
def test_a_bad_dim(files, capsys, value, words):
    err = bad(capsys, files["good"], "--torch", f"{HERE}:make_model", dim=("--dim", value))
    assert f"--dim {value}" in err and words in err, err


def test_a_symbolic_width_fixed_by_dim_agrees(files, capsys):
    code, out, err = cli(capsys, files["symbolic"], "--torch", f"{HERE}:make_model")
    assert code == 0, out + err


def test_the_command_line_itself(files):
    # the module entry point, in its own process
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-m", "equivcheck", "onnx", files["other"], "--torch",
                        f"{Path(__file__)}:make_model", "--dim", "x:1=4", "--examples", "2"],
                       check=False, capture_output=True, text=True, cwd=root,
                       timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "onnx is off" in p.stdout
