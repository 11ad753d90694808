"""Checkpoints: bad input gets a message naming file and key, writes are atomic, and the
planted conversion bugs (a transposed weight, bfloat16 through float16) are caught."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors", reason="pip install 'equivcheck[checkpoints]'")
pytest.importorskip("orbax.checkpoint", reason="pip install 'equivcheck[checkpoints]'")

from equivcheck import RunSettings, data, run_pair  # noqa: E402
from equivcheck import weights as W  # noqa: E402
from equivcheck.__main__ import main  # noqa: E402
from equivcheck.checkpoints import formats as ck  # noqa: E402 - its private _SAVE table is patched here
from equivcheck.engine.dtypes import np_dtype  # noqa: E402
from suites import ckpt_models as M  # noqa: E402

BF16 = np_dtype("bfloat16")
SUFFIXES = (".pt", ".safetensors", ".msgpack", "")


def state():
    rng = np.random.default_rng(0)
    return {"fc.weight": rng.standard_normal((3, 4)).astype(np.float32), "fc.bias": np.float16([1e-7, 2, 3]),
            "emb.weight": (rng.standard_normal((2, 2)) * 1e20).astype(BF16), "bn.num_batches_tracked": np.array(7)}


class Payload:
    """Unpickling this would create a file: the proof that nothing was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_pickle_that_is_not_a_state_dict_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "obj": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ck.CheckpointError, match=r"evil\.pt.*not a plain state_dict.*weights_only=True") as err:
        ck.load(tmp_path / "evil.pt")
    assert "can run code" in str(err.value) and "Unsupported global" in str(err.value)
    assert not marker.exists()


class Shell:
    """A payload through a module torch blocks outright (os): its refusal reads differently."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


def _evil_files(tmp_path, marker):
    """The same payload as torch.save writes it and as a bare pickle (protocol 2, which the
    weights-only unpickler reads far enough to meet the global)."""
    torch.save({"w": torch.ones(2), "obj": Payload(marker)}, tmp_path / "zip.pt")
    with open(tmp_path / "bare.pth", "wb") as f:
        pickle.dump({"w": Payload(marker)}, f, protocol=2)
    torch.save({"model": {"w": Shell(marker)}}, tmp_path / "train.bin")
    return {"zip": (tmp_path / "zip.pt", {}), "bare": (tmp_path / "bare.pth", {}),
            "key": (tmp_path / "train.bin", {"fmt": "torch", "key": "model"})}


LOAD_PATHS = {
    "load": lambda path, out, kw: ck.load(path, kw.get("fmt"), key=kw.get("key")),
    "convert": lambda path, out, kw: ck.convert(path, out, src_fmt=kw.get("fmt"), key=kw.get("key")),
    "cli": lambda path, out, kw: main(["convert", str(path), str(out), "--check"]
                                      + (["--from", kw["fmt"], "--key", kw["key"]] if kw else [])),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("file", ["zip", "bare", "key"])
@pytest.mark.parametrize("how", sorted(LOAD_PATHS))
def test_a_malicious_pickle_is_refused_on_every_load_path_naming_the_global(tmp_path, capsys, how, file):
    marker = tmp_path / "ran"
    path, kw = _evil_files(tmp_path, marker)[file]
    out = tmp_path / "out.safetensors"
    try:
        code = LOAD_PATHS[how](path, out, kw)
        message = capsys.readouterr().err
        assert code == 2, message
    except ck.CheckpointError as exc:
        message = str(exc)
    assert not marker.exists() and not out.exists()
    assert path.name in message and "weights_only=True" in message
    # Which global torch refused, not only its error class.
    assert ("Unsupported global posix.system" if file == "key" else "Unsupported global getattr") in message, message


def test_a_training_checkpoint_needs_key(tmp_path):
    sd = {k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) if v.dtype == BF16 else torch.from_numpy(v)
          for k, v in state().items()}
    torch.save({"model": sd, "epoch": 3}, tmp_path / "train.pt")
    with pytest.raises(ck.CheckpointError, match=r"training checkpoint.*\['model'\].*--key"):
        ck.load(tmp_path / "train.pt")
    assert ck.differences(state(), ck.load(tmp_path / "train.pt", key="model")) == []
    with pytest.raises(ck.CheckpointError, match="no entry 'weights'.*'epoch', 'model'"):
        ck.load(tmp_path / "train.pt", key="weights")
    torch.save({"w": torch.ones(1), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(ck.CheckpointError, match=r"\['step'\].*holds int, not a tensor"):
        ck.load(tmp_path / "mixed.pt")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip_is_bit_exact(tmp_path, suffix):
    path = ck.save(state(), tmp_path / f"ckpt{suffix or '_orbax'}")
    assert ck.differences(state(), ck.load(path)) == []


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_truncated_file_is_named(tmp_path, suffix):
    path = ck.save(state(), tmp_path / f"ckpt{suffix or '_orbax'}")
    files = sorted((p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()),
                   key=lambda p: p.stat().st_size)
    victim = files[-1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(ck.CheckpointError, match="truncated or not"):
        ck.load(path)


def test_unknown_suffix_and_missing_file_are_named(tmp_path):
    with pytest.raises(ck.CheckpointError, match=r"suffix '\.ckpt'"):
        ck.load(tmp_path / "a.ckpt")
    with pytest.raises(ck.CheckpointError, match="no such file"):
        ck.load(tmp_path / "nothing.pt")


def test_missing_extra_shape_and_dtype_mismatches_name_the_key():
    model = {k: v for k, v in M.TorchCNN().state_dict().items()}
    good = {k: v.numpy() for k, v in model.items()}
    ck.check_against(good, model)
    for broken, pattern in [
        ({k: v for k, v in good.items() if k != "features.0.bias"}, "missing key 'features.0.bias'"),
        ({**good, "features.1.weight": np.zeros(1)}, "unexpected key 'features.1.weight'"),
        ({**good, "classifier.2.weight": good["classifier.2.weight"].T}, r"'classifier.2.weight': shape \[16, 10\]"),
        ({**good, "classifier.2.bias": good["classifier.2.bias"].astype(np.float16)}, "'classifier.2.bias': dtype float16"),
    ]:
        with pytest.raises(ck.CheckpointError, match=pattern) as err:
            ck.check_against(broken, model)
        assert err.value.key == pattern.split("'")[1]
    with pytest.raises(ck.CheckpointError, match="missing key 'classifier.0.weight'"):
        W.torch_to_jax({k: v for k, v in good.items() if k != "classifier.0.weight"}, M.CNN_RULES)
    with pytest.raises(ck.CheckpointError, match=r"unexpected keys \['extra'\]"):
        W.torch_to_jax({**good, "extra": np.zeros(1)}, M.CNN_RULES)


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def half_then_fail(st, path):
        path.write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setitem(ck._SAVE, "safetensors", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        ck.save(state(), tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ck.CheckpointError, match=r"\['empty'\].*zero-size"):  # Orbax refuses empty arrays
        ck.save({"w": np.ones(2), "empty": np.zeros((0, 3))}, tmp_path / "orbax_out")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_replaced_only_when_asked(tmp_path):
    out = ck.save(state(), tmp_path / "a_orbax")
    with pytest.raises(ck.CheckpointError, match="already exists"):
        ck.save(state(), out)
    ck.save({"only": np.ones(1)}, out, overwrite=True)
    assert list(ck.load(out)) == ["only"] and sorted(p.name for p in tmp_path.iterdir()) == ["a_orbax"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the refused file is a plain pickle
def test_cli_convert_check_and_exit_codes(tmp_path, capsys, monkeypatch):
    src = ck.save(state(), tmp_path / "a.pt")
    assert main(["convert", str(src), str(tmp_path / "b.safetensors"), "--check"]) == 0
    assert "4 arrays identical bit for bit" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "b.safetensors"), str(tmp_path / "c"), "--check"]) == 0
    with open(tmp_path / "bad.pt", "wb") as f:
        pickle.dump({"w": Payload(tmp_path / "ran")}, f)
    assert main(["convert", str(tmp_path / "bad.pt"), str(tmp_path / "bad.safetensors")]) == 2
    assert "bad.pt" in capsys.readouterr().err and not (tmp_path / "bad.safetensors").exists()
    lossy = ck._SAVE["msgpack"]
    monkeypatch.setitem(ck._SAVE, "msgpack", lambda st, p: lossy({k: through_float16(v) for k, v in st.items()}, p))
    assert main(["convert", str(src), str(tmp_path / "d.msgpack"), "--check"]) == 1
    assert "'emb.weight'" in capsys.readouterr().err


# ---------------------------------------------------------------- planted conversion bugs


def through_float16(a):
    """The planted bug: bfloat16 rounded through float16 (overflows above 65504, flushes below 6e-8)."""
    return a.astype(np.float16).astype(BF16) if a.dtype == BF16 else a


def test_bfloat16_through_float16_is_caught_and_named():
    diffs = ck.differences(state(), {k: through_float16(v) for k, v in state().items()})
    assert len(diffs) == 1 and diffs[0].startswith("'emb.weight'"), diffs
    assert "cast through float16" in diffs[0]


def test_bfloat16_through_float16_is_found_by_the_round_trip_check(monkeypatch):
    from suites.test_checkpoints import STATES, chain

    lossy = ck._SAVE["msgpack"]
    monkeypatch.setitem(ck._SAVE, "msgpack", lambda st, p: lossy({k: through_float16(v) for k, v in st.items()}, p))
    rec = data.run_check("bf16_via_f16_bug", chain(["msgpack"]), STATES, dtype="float32",
                         run=RunSettings(examples=100, seed=3))
    assert rec.outcome == "failed" and "bfloat16 values differ in their bits" in rec.message, rec.message
    assert "cast through float16" in rec.message


def transposed_rules():
    """The planted bug: the square first layer converted without its transpose."""
    W.register_layout("linear_untransposed_bug",
                      W.Layout({"weight": "kernel", "bias": "bias"}, {"weight": lambda a, m: a, "bias": lambda a, m: a},
                               {"weight": lambda a, m: a, "bias": lambda a, m: a}, W.LAYOUTS["linear"].probe),
                      replace=True)
    return [W.Rule("0", "params/Dense_0", "linear_untransposed_bug"), M.MLP_RULES[1]]


def test_a_transposed_weight_is_named_by_the_probe():
    sd = M.torch_state(M.torch_mlp(), seed=1)
    assert W.probe(sd, W.torch_to_jax(sd, M.MLP_RULES), M.MLP_RULES) == []
    bad = W.probe(sd, W.torch_to_jax(sd, transposed_rules()), transposed_rules())
    assert len(bad) == 1 and bad[0].startswith("0.weight -> params.Dense_0.kernel") and "transposed" in bad[0]


def test_a_transposed_weight_fails_the_model_pair_and_is_blamed_on_jax():
    import jax.numpy as jnp

    from equivcheck import Custom, Floats, Inputs, Pair

    sd = M.torch_state(M.torch_mlp(), seed=1)
    model = M.torch_mlp()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    inputs = Inputs(Custom(lambda rng: ((int(rng.integers(1, 4)), 6),), ((1, 6),)), (Floats(-3, 3),))
    for rules, outcome in ((M.MLP_RULES, "passed"), (transposed_rules(), "failed")):
        params = W.torch_to_jax(sd, rules)
        pair = Pair(f"mlp_{outcome}", lambda x: model.to(x.dtype)(x),
                    lambda x, p=params: M.FlaxMLP().apply(jax_tree(p, x.dtype, jnp), x), inputs,
                    checks=("forward",), reference=lambda x: M.mlp_reference(sd, x))
        rec = run_pair(pair, dtype="float32", run=RunSettings(examples=30, seed=2))[0]
        assert rec.outcome == outcome, rec.failure_text()
    assert rec.side == "jax" and "jax is off" in rec.diagnosis


def jax_tree(params, dtype, jnp):
    return {k: jax_tree(v, dtype, jnp) if isinstance(v, dict) else jnp.asarray(v, dtype) for k, v in params.items()}
