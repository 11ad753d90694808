"""The image-transform table of the data suite: torchvision.transforms.v2 against
equivcheck.data.vision on jax.numpy, with equivcheck.data.vision on NumPy (float64) as the reference.

Raw images are uint8 HWC arrays as a data set stores them; later stages take float CHW
images in [0, 1]. Each pair is a forward check. Transforms that only move pixels (crops,
flips, pads, rotations, nearest resampling, dtype casts) must agree bit for bit (EXACT);
resampling pairs are held to the tolerance table: measured at float32 they differ by at most
1.2e-6 (bicubic) and 4.5e-7 (bilinear) on [0, 1] images, under the table's 1e-5 floor.
Random transforms run with torchvision's own random draws under a seed; the same draws,
taken with `drawn_params`, go to the JAX side explicitly.
"""
from __future__ import annotations

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as TF
from torchvision.transforms import ToTensor as ToTensorV1
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode as IM
from torchvision.transforms.v2 import functional as F

from equivcheck import Custom, Fixed, Floats, Inputs, Ints, Pair, Static, Tolerance
from equivcheck.data import vision as V

FLOATS = ("float32", "float64")
RAW = ("float32",)  # uint8 input: the output dtype is the transform's, whatever the run's dtype
EXACT = Tolerance(0.0, 0.0, "only moves, casts or scales pixels the way torchvision does: bit-exact")
# torchvision's native uint8 bilinear kernel (AVX2/AVX512 CPUs) resamples in fixed point; its float
# path and JAX resample in float32 and round. Measured: at most 1 level apart on random images.
ONE_LEVEL = Tolerance(0.0, 1.0, "uint8 output: torchvision's native uint8 kernels resample in fixed point, JAX in "
                                "float32 then rounds: bilinear measured at most 1 intensity level apart")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SEEDS = Static((0, 1, 2))
U8 = Ints(0, 255, dtype="uint8")
UNIT = Floats(0.0, 1.0, special=(0.0, 0.5, 1.0), tiny=False)
# torchvision centres with round((H - h) / 2), half to even: only odd margins can tell it from
# floor or ceil, and only margins 3 and 7 from floor. Random sizes meet them by luck; these
# images give crop (4, 3) margins 1, 3, 7, 8 x 1, 3, 7, 9 and crop (9, 14) a margin of 3 and padding.
CROP_MARGINS = Fixed((((1, 5, 4),), ((3, 7, 6),), ((1, 11, 10),), ((3, 12, 12),)))


def _shapes(layout: str, channels: tuple[int, ...], lo: int, hi: int) -> Custom:
    def sample(rng):
        h, w, c = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)), int(rng.choice(channels))
        return ((h, w, c) if layout == "hwc" else (c, h, w),)
    small = (lo, lo, channels[0]) if layout == "hwc" else (channels[0], lo, lo)
    return Custom(sample, (small,))


def raw(channels=(1, 3), lo=1, hi=12) -> Inputs:
    """A uint8 HWC image, as stored."""
    return Inputs(_shapes("hwc", channels, lo, hi), (U8,))


def img(*statics, channels=(1, 3), lo=1, hi=12) -> Inputs:
    """A float CHW image in [0, 1], plus static arguments."""
    return Inputs(_shapes("chw", channels, lo, hi), (UNIT, *statics))


def plain(t):
    """A tv_tensors.Image as the plain tensor the engine reads."""
    return t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else t


def tv(transform):
    """A torchvision transform applied to a tensor the engine hands over."""
    return lambda x: plain(transform(x))


def from_array(transform):
    """A torchvision transform applied to the raw ndarray (ToImage permutes ndarrays, not tensors)."""
    return lambda x: plain(transform(x.cpu().numpy()))


def jx(fn, **kw):
    return functools.partial(fn, xp=jnp, **kw)


def ref(fn, **kw):
    return functools.partial(fn, xp=np, **kw)


def pair(name, torch_fn, jax_fn, inputs, reference=None, dtypes=FLOATS, tolerance=None, doc="", witnesses=()):
    return Pair(name, torch_fn, jax_fn, inputs, diff_args=(), checks=("forward",), dtypes=dtypes,
                tolerance=tolerance, reference=reference, tags={"data"}, doc=doc, witnesses=witnesses,
                family="data")


def corner(c: int, h: int, w: int) -> np.ndarray:
    """A CHW image, black but for its last pixel: downsampled to (6, 5), each resampling rule
    spreads that one pixel differently (the resize divergences' witness)."""
    img = np.zeros((c, h, w))
    img[..., -1, -1] = 1.0
    return img


CORNER = ((corner(1, 12, 10),),)


# ---------------------------------------------------------------- random transforms, replayed


# torchvision draws from torch's global generator. The engine traces the next pair's JAX side
# (which replays draws) on a background thread while this one runs its torch side: without the
# lock the two threads reseed each other's generator mid-draw.
_RNG = threading.Lock()


def drawn_params(transform, shape, seed):
    """The parameters `transform` draws for an image of `shape` under torch.manual_seed(seed):
    the adapter that lets a JAX pipeline replay torchvision's random choices exactly."""
    with _RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(transform, v2.RandomHorizontalFlip):
            return {"apply": bool(torch.rand(1) < transform.p)}
        return transform.make_params([torch.empty(tuple(shape))])


def seeded(transform):
    """The real random transform, run under torch.manual_seed(seed)."""
    def run(x, seed):
        with _RNG, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return plain(transform(x))
    return run


RRC = v2.RandomResizedCrop((6, 5), antialias=True)
RCROP = v2.RandomCrop((7, 6), padding=1, pad_if_needed=True, fill=0.25)
RFLIP = v2.RandomHorizontalFlip(p=0.5)


def rrc(x, seed, xp):
    p = drawn_params(RRC, x.shape, seed)
    return V.resized_crop(x, p["top"], p["left"], p["height"], p["width"], (6, 5), "bilinear", True, xp=xp)


def rcrop(x, seed, xp):
    return V.random_crop(x, drawn_params(RCROP, x.shape, seed), fill=0.25, xp=xp)


def rflip(x, seed, xp):
    return V.hflip(x, xp) if drawn_params(RFLIP, x.shape, seed)["apply"] else x


# ---------------------------------------------------------------- composed pipelines


TORCH_PIPELINE = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Resize(8, antialias=True),
                             v2.CenterCrop(6), v2.Normalize(MEAN, STD)])


def pipeline(x, xp):
    x = V.to_dtype(V.to_image(x, xp), np.float32, scale=True, xp=xp)
    return V.normalize(V.center_crop(V.resize(x, 8, "bilinear", True, xp=xp), 6, xp), MEAN, STD, xp)


def resize_pair(name, mode, antialias, **kw):
    method = mode.value
    return pair(name, tv(v2.Resize((6, 5), interpolation=mode, antialias=antialias)),
                jx(V.resize, size=(6, 5), interpolation=method, antialias=antialias), img(**kw),
                ref(V.resize, size=(6, 5), interpolation=method, antialias=antialias))


PAIRS = [
    # conversions of raw uint8 HWC arrays
    pair("to_image", from_array(v2.ToImage()), jx(V.to_image), raw(), ref(V.to_image), RAW, EXACT),
    pair("to_image_to_dtype", from_array(v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])),
         lambda x: V.to_dtype(V.to_image(x, jnp), np.float32, scale=True, xp=jnp), raw(),
         lambda x: V.to_dtype(V.to_image(x), np.float32, scale=True), RAW, EXACT),
    pair("to_tensor", from_array(ToTensorV1()), jx(V.to_tensor), raw(), ref(V.to_tensor), RAW),
    # ToTensor divides by 255; XLA:CPU's vectorised float32 division is not correctly rounded.
    pair("to_tensor_bitexact", from_array(ToTensorV1()), jx(V.to_tensor), raw(), ref(V.to_tensor), RAW, EXACT,
         witnesses=(([[[3]]],),)),  # 3 / 255: 1 ulp apart under XLA:CPU
    pair("convert_image_dtype_uint8_to_float", lambda x: plain(v2.ConvertImageDtype(torch.float32)(
        v2.ToImage()(x.cpu().numpy()))), lambda x: V.to_dtype(V.to_image(x, jnp), np.float32, scale=True, xp=jnp),
         raw(), lambda x: V.to_dtype(V.to_image(x), np.float32, scale=True), RAW, EXACT),
    pair("convert_image_dtype_to_uint8", tv(v2.ConvertImageDtype(torch.uint8)),
         jx(V.to_dtype, dtype=np.uint8, scale=True), img(), ref(V.to_dtype, dtype=np.uint8, scale=True),
         tolerance=EXACT),
    pair("grayscale_uint8", lambda x: plain(F.rgb_to_grayscale(v2.ToImage()(x.cpu().numpy()))),
         lambda x: V.grayscale(V.to_image(x, jnp), xp=jnp), raw(channels=(3,)),
         lambda x: V.grayscale(V.to_image(x)), RAW, EXACT),
    pair("resize_bilinear_uint8", lambda x: plain(F.resize(v2.ToImage()(x.cpu().numpy()), [6, 5], IM.BILINEAR)),
         lambda x: V.resize(V.to_image(x, jnp), (6, 5), "bilinear", True, xp=jnp), raw(),
         lambda x: V.resize(V.to_image(x), (6, 5), "bilinear", True), RAW, ONE_LEVEL),
    pair("resize_bicubic_uint8", lambda x: plain(F.resize(v2.ToImage()(x.cpu().numpy()), [6, 5], IM.BICUBIC)),
         lambda x: V.resize(V.to_image(x, jnp), (6, 5), "bicubic", True, xp=jnp), raw(),
         lambda x: V.resize(V.to_image(x), (6, 5), "bicubic", True), RAW, ONE_LEVEL,
         witnesses=(([[[186, 101, 199], [65, 14, 63]], [[177, 255, 102], [46, 1, 72]], [[242, 35, 35], [171, 208, 157]]],),)),
    # float CHW images
    pair("normalize", tv(v2.Normalize(MEAN, STD)), jx(V.normalize, mean=MEAN, std=STD), img(channels=(3,)),
         ref(V.normalize, mean=MEAN, std=STD)),
    pair("grayscale", tv(v2.Grayscale(1)), jx(V.grayscale), img(channels=(3,)), ref(V.grayscale)),
    pair("grayscale_3", tv(v2.Grayscale(3)), jx(V.grayscale, num_output_channels=3), img(channels=(1, 3)),
         ref(V.grayscale, num_output_channels=3)),
    resize_pair("resize_bilinear_antialias", IM.BILINEAR, True),
    resize_pair("resize_bilinear", IM.BILINEAR, False),
    resize_pair("resize_bicubic_antialias", IM.BICUBIC, True),
    resize_pair("resize_bicubic", IM.BICUBIC, False),
    resize_pair("resize_nearest_exact", IM.NEAREST_EXACT, False),
    resize_pair("resize_nearest", IM.NEAREST, False),
    pair("resize_shorter_side", tv(v2.Resize(5, max_size=8, antialias=True)),
         jx(V.resize, size=5, max_size=8), img(lo=3), ref(V.resize, size=5, max_size=8)),
    # the defaults, side by side: known divergences (suites/known_divergences.txt)
    pair("resize_interpolate_vs_jax_defaults", lambda x: TF.interpolate(x[None], size=(6, 5), mode="bilinear")[0],
         lambda x: jax.image.resize(x, x.shape[:-2] + (6, 5), "bilinear"), img(),
         ref(V.resize, size=(6, 5), antialias=False), witnesses=CORNER),
    pair("resize_nearest_vs_jax_nearest", tv(v2.Resize((6, 5), interpolation=IM.NEAREST)),
         lambda x: jax.image.resize(x, x.shape[:-2] + (6, 5), "nearest"), img(),
         ref(V.resize, size=(6, 5), interpolation="nearest"), witnesses=CORNER),
    pair("resize_bicubic_vs_jax_cubic", tv(v2.Resize((6, 5), interpolation=IM.BICUBIC, antialias=False)),
         lambda x: jax.image.resize(x, x.shape[:-2] + (6, 5), "cubic", antialias=False), img(),
         ref(V.resize, size=(6, 5), interpolation="bicubic", antialias=False), witnesses=CORNER),
    # geometry: bit-exact
    pair("center_crop", lambda x, s: plain(F.center_crop(x, list(s))), lambda x, s: V.center_crop(x, s, jnp),
         Inputs(CROP_MARGINS, (UNIT, Static(((4, 3), (9, 14))))), lambda x, s: V.center_crop(x, s), tolerance=EXACT),
    pair("crop", lambda x, b: plain(F.crop(x, *b)), lambda x, b: V.crop(x, *b, xp=jnp),
         img(Static(((1, 0, 3, 2), (-2, 3, 8, 5)))), lambda x, b: V.crop(x, *b), tolerance=EXACT),
    pair("image_pad_constant", tv(v2.Pad([1, 2, 3, 0], fill=0.5)), jx(V.pad, padding=[1, 2, 3, 0], fill=0.5), img(),
         ref(V.pad, padding=[1, 2, 3, 0], fill=0.5), tolerance=EXACT),
    pair("image_pad_reflect", tv(v2.Pad([2, 1], padding_mode="reflect")), jx(V.pad, padding=[2, 1], padding_mode="reflect"),
         img(lo=3), ref(V.pad, padding=[2, 1], padding_mode="reflect"), tolerance=EXACT),
    pair("image_pad_edge", tv(v2.Pad(2, padding_mode="edge")), jx(V.pad, padding=2, padding_mode="edge"), img(),
         ref(V.pad, padding=2, padding_mode="edge"), tolerance=EXACT),
    pair("image_pad_symmetric", tv(v2.Pad([1, 2], padding_mode="symmetric")),
         jx(V.pad, padding=[1, 2], padding_mode="symmetric"), img(lo=2),
         ref(V.pad, padding=[1, 2], padding_mode="symmetric"), tolerance=EXACT),
    pair("hflip", tv(v2.RandomHorizontalFlip(p=1.0)), jx(V.hflip), img(), ref(V.hflip), tolerance=EXACT),
    pair("vflip", tv(v2.RandomVerticalFlip(p=1.0)), jx(V.vflip), img(), ref(V.vflip), tolerance=EXACT),
    pair("rotate90", lambda x, a: plain(F.rotate(x, a, expand=True)), lambda x, a: V.rotate90(x, a, jnp),
         img(Static((90, 180, 270))), lambda x, a: V.rotate90(x, a), tolerance=EXACT),
    # random transforms with torchvision's draws replayed on the JAX side
    pair("random_crop", seeded(RCROP), functools.partial(rcrop, xp=jnp), img(SEEDS),
         functools.partial(rcrop, xp=np), tolerance=EXACT),
    pair("random_horizontal_flip", seeded(RFLIP), functools.partial(rflip, xp=jnp), img(SEEDS),
         functools.partial(rflip, xp=np), tolerance=EXACT),
    pair("random_resized_crop", seeded(RRC), functools.partial(rrc, xp=jnp), img(SEEDS),
         functools.partial(rrc, xp=np)),
    # a whole torchvision pipeline from the raw array
    pair("compose_imagenet_style", from_array(TORCH_PIPELINE), functools.partial(pipeline, xp=jnp),
         raw(channels=(3,)), functools.partial(pipeline, xp=np), RAW),
]
