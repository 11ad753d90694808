"""Image transforms with torchvision.transforms.v2 semantics, for NumPy and JAX pipelines.

Every function takes the array module as `xp` (NumPy, the default for host-side loaders
such as Grain's, or `jax.numpy` inside jit) and works on (..., C, H, W) images like
torchvision, except `to_image`/`to_tensor`, which take the raw HWC arrays a data set holds.
Shapes, sizes and crop parameters are Python ints, so under jit they are static.

Where torchvision's semantics are not the obvious ones, the function follows torchvision,
and the docstring says how (the suites check each against torchvision):
- ToDtype(scale=True) multiplies by 1/255 (ToTensor divides by 255: the two differ by 1 ulp);
  float -> uint8 multiplies by 256 - 1e-3 and truncates, it does not round.
- CenterCrop puts the crop at round((H - h) / 2) with Python's round (half to even).
- Resize(int) scales the shorter side to `size`, the longer to int(size * long / short).
- Interpolation "nearest" picks floor(i * in / out) (legacy); "nearest-exact" (and
  jax.image.resize's "nearest") floor((i + 0.5) * in / out).
- Bicubic without antialias uses Keys' kernel with a = -0.75 and clamps at the border
  (jax.image.resize's "cubic-pytorch"); with antialias a = -0.5 and border weights
  renormalised (jax's "cubic"). jax's antialias only acts when downsampling, as torch's.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma)
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")


def _is_jax(xp: Any) -> bool:
    return xp is not np and getattr(xp, "__name__", "").startswith("jax")


# ----------------------------------------------------------------------- conversions


def to_image(x: Any, xp: Any = np) -> Any:
    """v2.ToImage on an ndarray: HWC -> CHW (HW -> 1HW), dtype kept."""
    if x.ndim == 2:
        return x[None]
    if x.ndim != 3:
        raise ValueError(f"to_image: expected an HWC or HW array, got shape {tuple(x.shape)}")
    return xp.transpose(x, (2, 0, 1))


def _max_value(dtype: Any) -> int:
    return int(np.iinfo(np.dtype(dtype)).max)


def to_dtype(x: Any, dtype: Any, scale: bool = False, xp: Any = np) -> Any:
    """v2.ToDtype / ConvertImageDtype. int -> float: x * (1 / max); float -> int: x * (max + 1 - 1e-3),
    truncated; float -> float and scale=False: a plain cast."""
    src, dst = np.dtype(x.dtype), np.dtype(dtype)
    if src == dst or not scale:
        return x.astype(dst)
    if src.kind == "f" and dst.kind == "f":
        return x.astype(dst)
    if src.kind in "iu" and dst.kind == "f":
        return x.astype(dst) * dst.type(1.0 / _max_value(src))
    if src.kind == "f" and dst.kind in "iu":
        return (x * src.type(_max_value(dst) + 1.0 - 1e-3)).astype(dst)
    raise ValueError(f"to_dtype: {src} -> {dst} with scale=True is not an image conversion")


def to_tensor(x: Any, xp: Any = np) -> Any:
    """v1 ToTensor on a uint8 HWC array: CHW float32, divided by 255 (not multiplied by 1/255)."""
    return to_image(x, xp).astype(np.float32) / np.float32(255)


def normalize(x: Any, mean: Sequence[float], std: Sequence[float], xp: Any = np) -> Any:
    """v2.Normalize: (x - mean[c]) / std[c] over the channel axis (-3), in x's dtype."""
    if not np.issubdtype(np.dtype(x.dtype), np.floating):
        raise TypeError(f"normalize: expected a float image, got {x.dtype}")
    if not all(std):
        raise ValueError("normalize: std evaluated to zero, leading to division by zero")
    m = xp.asarray(np.asarray(mean, dtype=x.dtype).reshape(-1, 1, 1))
    s = xp.asarray(np.asarray(std, dtype=x.dtype).reshape(-1, 1, 1))
    return (x - m) / s


def grayscale(x: Any, num_output_channels: int = 1, xp: Any = np) -> Any:
    """v2.Grayscale: 0.2989 r + 0.587 g + 0.114 b, computed in float32 for integer images and
    cast back by truncation, as torch's .to(uint8) does."""
    if num_output_channels not in (1, 3):
        raise ValueError(f"num_output_channels must be 1 or 3, got {num_output_channels}")
    if x.shape[-3] == 1:
        return x if num_output_channels == 1 else xp.concatenate([x] * 3, axis=-3)
    work = x if np.issubdtype(np.dtype(x.dtype), np.floating) else x.astype(np.float32)
    r, g, b = work[..., 0, :, :], work[..., 1, :, :], work[..., 2, :, :]
    w = [np.dtype(work.dtype).type(c) for c in GRAY]
    gray = (r * w[0] + g * w[1] + b * w[2]).astype(x.dtype)[..., None, :, :]
    return gray if num_output_channels == 1 else xp.concatenate([gray] * 3, axis=-3)


# ----------------------------------------------------------------------- geometry


def hflip(x: Any, xp: Any = np) -> Any:
    return xp.flip(x, axis=-1)


def vflip(x: Any, xp: Any = np) -> Any:
    return xp.flip(x, axis=-2)


def rotate90(x: Any, angle: int, xp: Any = np) -> Any:
    """v2 rotate by a multiple of 90 degrees (counter-clockwise) with expand=True."""
    if angle % 90:
        raise ValueError(f"rotate90: {angle} is not a multiple of 90 degrees")
    return xp.rot90(x, k=(angle // 90) % 4, axes=(-2, -1))


def _pad_widths(x: Any, left: int, top: int, right: int, bottom: int) -> list[tuple[int, int]]:
    return [(0, 0)] * (x.ndim - 2) + [(top, bottom), (left, right)]


def pad(x: Any, padding: int | Sequence[int], fill: float = 0, padding_mode: str = "constant", xp: Any = np) -> Any:
    """v2.Pad: padding an int (all sides), [left/right, top/bottom] or [left, top, right, bottom]."""
    p = [padding] if isinstance(padding, int) else list(padding)
    if len(p) == 1:
        p = p * 4
    elif len(p) == 2:
        p = [p[0], p[1], p[0], p[1]]
    elif len(p) != 4:
        raise ValueError(f"pad: padding must have 1, 2 or 4 values, got {padding!r}")
    widths = _pad_widths(x, *p)
    if padding_mode == "constant":
        return xp.pad(x, widths, mode="constant", constant_values=fill)
    if padding_mode not in ("edge", "reflect", "symmetric"):
        raise ValueError(f"pad: unknown padding_mode {padding_mode!r}")
    return xp.pad(x, widths, mode=padding_mode)


def crop(x: Any, top: int, left: int, height: int, width: int, xp: Any = np) -> Any:
    """v2 functional crop; the part of the box outside the image is zero, as in torchvision."""
    h, w = x.shape[-2:]
    pads = (max(-left, 0), max(-top, 0), max(left + width - w, 0), max(top + height - h, 0))
    if any(pads):
        x = xp.pad(x, _pad_widths(x, *pads), mode="constant")
        top, left = top + pads[1], left + pads[0]
    return x[..., top:top + height, left:left + width]


def center_crop(x: Any, size: int | Sequence[int], xp: Any = np) -> Any:
    """v2.CenterCrop: zero padding first where the crop is larger; anchor round((H - h) / 2)."""
    ch, cw = (size, size) if isinstance(size, int) else (size[0], size[-1])
    h, w = x.shape[-2:]
    if ch > h or cw > w:
        pads = [(cw - w) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0,
                (cw - w + 1) // 2 if cw > w else 0, (ch - h + 1) // 2 if ch > h else 0]
        x = xp.pad(x, _pad_widths(x, *pads), mode="constant")
        h, w = x.shape[-2:]
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return x[..., top:top + ch, left:left + cw]


# ----------------------------------------------------------------------- resampling


def output_size(h: int, w: int, size: int | Sequence[int], max_size: int | None = None) -> tuple[int, int]:
    """torchvision's Resize size rule: a pair is (h, w); an int is the shorter side."""
    if not isinstance(size, int):
        return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if h <= w else (new_long, new_short)


def _nearest_index(n_in: int, n_out: int, exact: bool) -> np.ndarray:
    # Both frameworks compute the source index in float32.
    scale = np.float32(n_in) / np.float32(n_out)
    pos = (np.arange(n_out, dtype=np.float32) + np.float32(0.5 if exact else 0.0)) * scale
    return np.minimum(np.floor(pos).astype(np.int64), n_in - 1)


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


def _keys(a: float) -> Callable[[np.ndarray], np.ndarray]:
    def kernel(x: np.ndarray) -> np.ndarray:
        x = np.abs(x)
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return np.where(x < 1, near, np.where(x < 2, far, 0.0))
    return kernel


def resample_matrix(n_in: int, n_out: int, interpolation: str, antialias: bool) -> np.ndarray:
    """(n_out, n_in) float64 weights of one axis, as torch's interpolate computes them.

    The kernel is centred at (i + 0.5) * n_in / n_out - 0.5; with antialias and downsampling it
    is stretched by n_in / n_out; weights are renormalised over the pixels inside the image,
    except bicubic without antialias, which clamps the taps to the border pixels.
    """
    if interpolation in ("nearest", "nearest-exact"):
        m = np.zeros((n_out, n_in))
        m[np.arange(n_out), _nearest_index(n_in, n_out, interpolation == "nearest-exact")] = 1.0
        return m
    kernel, radius = {"bilinear": (_triangle, 1), "bicubic": (_keys(-0.5 if antialias else -0.75), 2)}[interpolation]
    inv = n_in / n_out
    stretch = max(inv, 1.0) if antialias else 1.0
    centre = (np.arange(n_out) + 0.5) * inv - 0.5
    clamp = interpolation == "bicubic" and not antialias
    k = radius if clamp else 0
    taps = np.arange(-k, n_in + k)
    w = kernel((taps[None, :] - centre[:, None]) / stretch)
    w = w / w.sum(axis=1, keepdims=True)
    if clamp:  # taps outside the image read the border pixel
        folded = np.zeros((n_out, n_in))
        np.add.at(folded.T, np.clip(taps, 0, n_in - 1), w.T)
        w = folded
    return w


def _jax_method(interpolation: str, antialias: bool) -> str:
    if interpolation == "bicubic":
        return "cubic" if antialias else "cubic-pytorch"
    return {"bilinear": "linear", "nearest-exact": "nearest"}[interpolation]


def resize(x: Any, size: int | Sequence[int], interpolation: str = "bilinear", antialias: bool = True,
           max_size: int | None = None, xp: Any = np) -> Any:
    """v2.Resize. Integer images resample in float32 and are rounded back (torchvision's
    portable path; its native uint8 kernels round differently, see the data suite)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"resize: interpolation {interpolation!r} not among {INTERPOLATIONS}")
    h, w = x.shape[-2:]
    oh, ow = output_size(h, w, size, max_size)
    if (oh, ow) == (h, w):
        return x
    if interpolation.startswith("nearest"):
        exact = interpolation == "nearest-exact"
        if _is_jax(xp) and exact:
            import jax

            return jax.image.resize(x, x.shape[:-2] + (oh, ow), "nearest")
        rows, cols = _nearest_index(h, oh, exact), _nearest_index(w, ow, exact)
        return x[..., rows, :][..., cols]
    dtype = np.dtype(x.dtype)
    work = x if dtype.kind == "f" else x.astype(np.float32)
    if _is_jax(xp):
        import jax

        out = jax.image.resize(work, work.shape[:-2] + (oh, ow), _jax_method(interpolation, antialias),
                               antialias=antialias)
    else:
        mh = resample_matrix(h, oh, interpolation, antialias).astype(work.dtype)
        mw = resample_matrix(w, ow, interpolation, antialias).astype(work.dtype)
        out = np.einsum("hH,...HW,wW->...hw", mh, work, mw)
    if dtype.kind == "f":
        return out
    info = np.iinfo(dtype)
    return xp.clip(xp.round(out), info.min, info.max).astype(dtype)


def resized_crop(x: Any, top: int, left: int, height: int, width: int, size: int | Sequence[int],
                 interpolation: str = "bilinear", antialias: bool = True, xp: Any = np) -> Any:
    return resize(crop(x, top, left, height, width, xp), size, interpolation, antialias, xp=xp)


# ----------------------------------------------------------------------- random transforms, replayed


def random_crop(x: Any, params: dict[str, Any], fill: float = 0, padding_mode: str = "constant", xp: Any = np) -> Any:
    """v2.RandomCrop with its drawn parameters (`params` as RandomCrop.make_params gives them)."""
    if params["needs_pad"]:
        x = pad(x, params["padding"], fill, padding_mode, xp)
    if params["needs_crop"]:
        x = crop(x, params["top"], params["left"], params["height"], params["width"], xp)
    return x


def compose(*fns: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def run(x: Any) -> Any:
        for fn in fns:
            x = fn(x)
        return x
    return run
