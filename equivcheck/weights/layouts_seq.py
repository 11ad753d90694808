"""Recurrent and attention layouts, torch state_dict <-> Flax tree (see equivcheck.weights.convert)."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from equivcheck.weights.layouts import SD, TREE, ConversionError, _check, _flat, _ndim, _xp

LSTM_GATES = ("i", "f", "g", "o")  # torch's row order; Flax names the gate Linears ii/if_/ig/io, hi/hf/hg/ho
GRU_GATES = ("r", "z", "n")


# Bidirectional layers: torch suffixes the reverse direction's keys; Flax's linen.Bidirectional
# holds the two RNNs under these names, so a layer's tree is what it takes as its params.
DIRECTIONS = (("", "forward_rnn"), ("_reverse", "backward_rnn"))


def _rnn_layers(kind: str, sd: Mapping[str, Any]) -> tuple[int, int]:
    """(layers, directions) of a torch RNN state_dict."""
    dirs = 2 if any(key.endswith("_reverse") for key in sd) else 1
    for key in sd:
        if (key.endswith("_reverse") and kind == "lstm") or key.startswith("weight_hr"):
            what = "proj_size" if key.startswith("weight_hr") else "bidirectional"
            raise ConversionError(f"{kind}: {SD} key {key!r}: {what} is not supported (no Flax counterpart here)")
    layers = sorted({int(m.group(1)) for k in sd if (m := re.fullmatch(r"\w+_l(\d+)(_reverse)?", k))})
    if not layers:
        raise ConversionError(f"{kind}: the {SD} is missing 'weight_ih_l0' (expected keys: weight_ih_l0, "
                              "weight_hh_l0, bias_ih_l0, bias_hh_l0, ...)")
    return layers[-1] + 1, dirs


def _rnn_want(kind: str, sd: Mapping[str, Any], n_gates: int) -> tuple[int, int, int]:
    """(layers, hidden size, directions), the state_dict checked key for key."""
    n, dirs = _rnn_layers(kind, sd)
    _ndim(kind, SD, "weight_hh_l0", sd.get("weight_hh_l0", np.zeros((0, 0))), (2,))
    hidden = np.shape(sd["weight_hh_l0"])[1]
    _ndim(kind, SD, "weight_ih_l0", sd.get("weight_ih_l0", np.zeros((0, 0))), (2,))
    want: dict[str, Any] = {}
    bias = "bias_ih_l0" in sd or "bias_hh_l0" in sd
    for k in range(n):
        in_k = np.shape(sd["weight_ih_l0"])[1] if k == 0 else dirs * hidden
        for sfx, _ in DIRECTIONS[:dirs]:
            want |= {f"weight_ih_l{k}{sfx}": (n_gates * hidden, in_k),
                     f"weight_hh_l{k}{sfx}": (n_gates * hidden, hidden)}
            if bias:
                want |= {f"bias_ih_l{k}{sfx}": (n_gates * hidden,), f"bias_hh_l{k}{sfx}": (n_gates * hidden,)}
    _check(kind, SD, sd, want)
    return n, hidden, dirs


def _rows(w: Any, n: int) -> list[Any]:
    h = w.shape[0] // n
    return [w[i * h:(i + 1) * h] for i in range(n)]


def _lstm_to_jax(sd: Mapping[str, Any], **_: Any) -> list[dict[str, Any]]:
    n, hidden, _ = _rnn_want("lstm", sd, 4)
    layers = []
    for k in range(n):
        wi, wh = _rows(sd[f"weight_ih_l{k}"], 4), _rows(sd[f"weight_hh_l{k}"], 4)
        if f"bias_ih_l{k}" in sd:
            b = _rows(sd[f"bias_ih_l{k}"] + sd[f"bias_hh_l{k}"], 4)
        else:
            b = [_xp(w).zeros(hidden, w.dtype) for w in wh]
        cell = {}
        for g, a, c, bias in zip(LSTM_GATES, wi, wh, b):
            cell["i" + ("f_" if g == "f" else g)] = {"kernel": a.T}
            cell["h" + g] = {"kernel": c.T, "bias": bias}
        layers.append(cell)
    return layers


def _cat(parts: list[Any]) -> Any:
    return _xp(parts[0]).concatenate(parts, axis=0)


def _directions(kind: str, layer: Any, k: int) -> list[tuple[str, str, Any]]:
    """(torch key suffix, tree path, cell) of each direction of layer k's tree: a cell, or a
    linen.Bidirectional's params {"forward_rnn": {"cell": ...}, "backward_rnn": {"cell": ...}}."""
    if not isinstance(layer, Mapping):
        raise ConversionError(f"{kind}: {TREE} item {k} is a {type(layer).__name__}, not a cell's parameters")
    if "forward_rnn" not in layer and "backward_rnn" not in layer:
        return [("", f"{k}/", layer)]
    if kind == "lstm":
        raise ConversionError(f"lstm: {TREE} item {k} is bidirectional: bidirectional is not supported")
    out = []
    for sfx, name in DIRECTIONS:
        cell = layer.get(name, {}).get("cell") if isinstance(layer.get(name), Mapping) else None
        if not isinstance(cell, Mapping):
            raise ConversionError(f"{kind}: the {TREE} is missing '{k}/{name}/cell' (a bidirectional layer holds "
                                  f"{DIRECTIONS[0][1]!r} and {DIRECTIONS[1][1]!r}, each with a 'cell')")
        out.append((sfx, f"{k}/{name}/cell/", cell))
    extra = sorted(set(layer) - {name for _, name in DIRECTIONS})
    if extra:
        raise ConversionError(f"{kind}: the {TREE} has an unexpected key '{k}/{extra[0]}'")
    return out


def _rnn_tree_want(kind: str, tree: Any, names: dict[str, bool]) -> tuple[int, int, list[list[Any]]]:
    """(layers, hidden size, each layer's directions as in `_directions`), the tree checked."""
    if not isinstance(tree, (list, tuple)) or not tree:
        raise ConversionError(f"{kind}: the {TREE} must be a non-empty list of per-layer cell parameters, "
                              f"got {type(tree).__name__}")
    layers = [_directions(kind, layer, k) for k, layer in enumerate(tree)]
    dirs = len(layers[0])
    _, where, cell0 = layers[0][0]
    h_name, i_name = ("hi", "ii") if kind == "lstm" else ("hr", "ir")
    first = cell0.get(h_name, {}).get("kernel")
    if first is None:
        raise ConversionError(f"{kind}: the {TREE} is missing '{where}{h_name}/kernel'")
    hidden = np.shape(first)[0]
    in0 = np.shape(cell0.get(i_name, {}).get("kernel", np.zeros((0, 0))))[0]
    want, flat = {}, {}
    for k, directions in enumerate(layers):
        if len(directions) != dirs:
            raise ConversionError(f"{kind}: {TREE} item {k} has {len(directions)} direction(s), item 0 has {dirs}")
        in_k = in0 if k == 0 else dirs * hidden
        for _, where, cell in directions:
            flat |= {f"{where}{p}": v for p, v in _flat(cell).items()}
            for name, has_bias in names.items():
                want[f"{where}{name}/kernel"] = (in_k if name[0] == "i" else hidden, hidden)
                if has_bias:
                    want[f"{where}{name}/bias"] = (hidden,)
    _check(kind, TREE, flat, want)
    return len(tree), hidden, layers


def _lstm_to_torch(tree: Any, bias: bool = True, **_: Any) -> dict[str, Any]:
    names = {"ii": False, "if_": False, "ig": False, "io": False, "hi": True, "hf": True, "hg": True, "ho": True}
    _rnn_tree_want("lstm", tree, names)
    sd: dict[str, Any] = {}
    for k, cell in enumerate(tree):
        sd[f"weight_ih_l{k}"] = _cat([cell["i" + ("f_" if g == "f" else g)]["kernel"].T for g in LSTM_GATES])
        sd[f"weight_hh_l{k}"] = _cat([cell["h" + g]["kernel"].T for g in LSTM_GATES])
        b = _cat([cell["h" + g]["bias"] for g in LSTM_GATES])
        if bias:
            sd[f"bias_ih_l{k}"] = _xp(b).zeros_like(b)
            sd[f"bias_hh_l{k}"] = b
        elif _xp(b) is np and np.any(b != 0):
            raise ConversionError(f"lstm: {TREE} key '{k}/hi/bias' (or another gate's) is nonzero but bias=False")
    return sd


def _gru_cell(sd: Mapping[str, Any], key: str, hidden: int) -> dict[str, Any]:
    """One direction of one layer (`key`: "l0", "l1_reverse", ...) as linen.GRUCell's params."""
    (wr, wz, wn), (ur, uz, un) = _rows(sd[f"weight_ih_{key}"], 3), _rows(sd[f"weight_hh_{key}"], 3)
    if f"bias_ih_{key}" in sd:
        (br, bz, bn), (cr, cz, cn) = _rows(sd[f"bias_ih_{key}"], 3), _rows(sd[f"bias_hh_{key}"], 3)
        br, bz = br + cr, bz + cz
    else:
        br = bz = bn = cn = _xp(wr).zeros(hidden, wr.dtype)
    return {"ir": {"kernel": wr.T, "bias": br}, "iz": {"kernel": wz.T, "bias": bz},
            "in": {"kernel": wn.T, "bias": bn}, "hr": {"kernel": ur.T}, "hz": {"kernel": uz.T},
            "hn": {"kernel": un.T, "bias": cn}}


def _gru_to_jax(sd: Mapping[str, Any], **_: Any) -> list[dict[str, Any]]:
    n, hidden, dirs = _rnn_want("gru", sd, 3)
    if dirs == 1:
        return [_gru_cell(sd, f"l{k}", hidden) for k in range(n)]
    return [{name: {"cell": _gru_cell(sd, f"l{k}{sfx}", hidden)} for sfx, name in DIRECTIONS} for k in range(n)]


def _gru_to_torch(tree: Any, **_: Any) -> dict[str, Any]:
    names = {"ir": True, "iz": True, "in": True, "hr": False, "hz": False, "hn": True}
    _, _, layers = _rnn_tree_want("gru", tree, names)
    sd: dict[str, Any] = {}
    for k, directions in enumerate(layers):
        for sfx, _, cell in directions:
            key = f"l{k}{sfx}"
            sd[f"weight_ih_{key}"] = _cat([cell["i" + g]["kernel"].T for g in GRU_GATES])
            sd[f"weight_hh_{key}"] = _cat([cell["h" + g]["kernel"].T for g in GRU_GATES])
            zero = _xp(cell["hn"]["bias"]).zeros_like(cell["hn"]["bias"])
            sd[f"bias_ih_{key}"] = _cat([cell["i" + g]["bias"] for g in GRU_GATES])
            sd[f"bias_hh_{key}"] = _cat([zero, zero, cell["hn"]["bias"]])
    return sd


def _mha_to_jax(sd: Mapping[str, Any], num_heads: int | None = None, **_: Any) -> dict[str, Any]:
    if num_heads is None:
        raise ConversionError("mha: num_heads is needed to split the projections into heads")
    for key in ("bias_k", "bias_v"):
        if key in sd:
            raise ConversionError(f"mha: {SD} key {key!r}: add_bias_kv is not supported (Flax has no counterpart)")
    _ndim("mha", SD, "out_proj.weight", sd.get("out_proj.weight", np.zeros((0, 0))), (2,))
    e = np.shape(sd["out_proj.weight"])[0]
    if e % num_heads:
        raise ConversionError(f"mha: embed_dim {e} (from 'out_proj.weight') is not divisible by num_heads {num_heads}")
    d = e // num_heads
    packed = "in_proj_weight" in sd
    if packed:
        want: dict[str, Any] = {"in_proj_weight": (3 * e, e)}
    else:
        kdim = np.shape(sd.get("k_proj_weight", np.zeros((e, e))))[-1]
        want = {"q_proj_weight": (e, e), "k_proj_weight": (e, kdim), "v_proj_weight": (e, kdim)}
    bias = "in_proj_bias" in sd
    want |= {"out_proj.weight": (e, e)} | ({"in_proj_bias": (3 * e,), "out_proj.bias": (e,)} if bias else {})
    _check("mha", SD, sd, want)
    ws = _rows(sd["in_proj_weight"], 3) if packed else [sd[f"{p}_proj_weight"] for p in "qkv"]
    bs = _rows(sd["in_proj_bias"], 3) if bias else [None] * 3
    tree: dict[str, Any] = {}
    for name, w, b in zip(("query", "key", "value"), ws, bs):
        tree[name] = {"kernel": w.T.reshape(w.shape[1], num_heads, d)}
        if bias:
            tree[name]["bias"] = b.reshape(num_heads, d)
    wo = sd["out_proj.weight"]
    tree["out"] = {"kernel": wo.T.reshape(num_heads, d, e)} | ({"bias": sd["out_proj.bias"]} if bias else {})
    return tree


def _mha_to_torch(tree: Mapping[str, Any], packed: bool | None = None, **_: Any) -> dict[str, Any]:
    out_k = tree.get("out", {}).get("kernel")
    if out_k is None or np.ndim(out_k) != 3:
        raise ConversionError(f"mha: the {TREE} is missing 'out/kernel' of shape (heads, head_dim, embed_dim)")
    h, d, e = np.shape(out_k)
    kdim = np.shape(tree.get("key", {}).get("kernel", np.zeros((e, h, d))))[0]
    bias = "bias" in tree.get("out", {})
    want: dict[str, Any] = {"query/kernel": (e, h, d), "key/kernel": (kdim, h, d), "value/kernel": (kdim, h, d),
                            "out/kernel": (h, d, e)}
    if bias:
        want |= {"query/bias": (h, d), "key/bias": (h, d), "value/bias": (h, d), "out/bias": (e,)}
    _check("mha", TREE, _flat(tree), want)
    packed = kdim == e if packed is None else packed
    ws = [tree[n]["kernel"].reshape(-1, e).T for n in ("query", "key", "value")]
    sd: dict[str, Any] = {"in_proj_weight": _cat(ws)} if packed else {f"{p}_proj_weight": w for p, w in zip("qkv", ws)}
    if bias:
        sd["in_proj_bias"] = _cat([tree[n]["bias"].reshape(e) for n in ("query", "key", "value")])
    sd["out_proj.weight"] = out_k.reshape(e, e).T
    if bias:
        sd["out_proj.bias"] = tree["out"]["bias"]
    return sd
