"""Model-based rewards on tiny random-weight models built and saved here: no download, real loading paths.

Every CLIP reward is built through ``build_reward`` from a local ``save_pretrained`` directory (the same
``from_pretrained`` call a hub id goes through); the aesthetic head is a random ``.pth`` in the original key
layout. The optional-extra rewards (hpsv2, imagereward) are checked for their missing-dependency message and,
with stand-in modules, for their wiring.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import argparse
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPModel, CLIPTokenizer

from sdpo.policy.tokenizer import build_clip_tokenizer
from sdpo.rewards import RewardModel, available_rewards, build_reward, clip_preprocess, fetch_file
from sdpo.rewards.clip_based import AestheticHead
from sdpo.rewards.preprocess import CLIP_MEAN, CLIP_STD, parse_dtype
from tests.conftest import build_aesthetic_head, build_tiny_clip

WORDS = ["a", "photo", "of", "cat", "dog", "red", "car", "blue", "sky"]
IMAGE_SIZE = 32
PROJECTION = 16
CLIP_REWARDS = ["pickscore", "clip_score", "aesthetic"]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny CLIPModel + CLIP tokenizer saved like a hub repo (config, safetensors, tokenizer files)."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), WORDS, IMAGE_SIZE, PROJECTION)


@pytest.fixture(scope="module")
def head_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random aesthetic head saved as the original ``.pth``: a plain state dict keyed ``layers.N.*``."""
    return build_aesthetic_head(tmp_path_factory.mktemp("head") / "sac+logos+ava1-l14-linearMSE.pth", PROJECTION)


@pytest.fixture(scope="module")
def reference_clip(tiny_clip_dir: Path) -> CLIPModel:
    return CLIPModel.from_pretrained(tiny_clip_dir).eval()


def reward_kwargs(name: str, clip_dir: Path, head: Path) -> dict:
    if name == "pickscore":
        return {"model": str(clip_dir), "processor": str(clip_dir)}
    if name == "clip_score":
        return {"model": str(clip_dir)}
    if name == "aesthetic":
        return {"clip_model": str(clip_dir), "head_source": str(head)}
    raise KeyError(name)


@pytest.fixture(scope="module")
def fp32_rewards(tiny_clip_dir: Path, head_path: Path) -> dict[str, RewardModel]:
    return {name: build_reward(name, **reward_kwargs(name, tiny_clip_dir, head_path)) for name in CLIP_REWARDS}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Non-square images of different content (resize + crop paths are exercised)."""
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 3, 40, 48, generator=g)
    flat = torch.full((1, 3, 40, 48), 0.6)
    ramp = torch.linspace(0, 1, 48).view(1, 1, 1, 48).expand(1, 3, 40, 48)
    return torch.cat([noise, flat, ramp]).contiguous()


PROMPTS = ["a photo of a cat", "a red car", "a photo of a cat", "blue sky"]


def features(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and an output object in transformers 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def reference_cosine(model: CLIPModel, tokenizer, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """cos(image, text) through CLIPModel's own public feature API, independent of the reward's code."""
    with torch.no_grad():
        img = features(model.get_image_features(pixel_values=pixels))
        tok = tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        txt = features(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1)


# ---------------------------------------------------------------------------------------------- preprocess


def _image_processor():
    try:  # transformers 5 without torchvision: the PIL backend (what CLIPImageProcessor falls back to anyway)
        from transformers import CLIPImageProcessorPil as processor_cls
    except ImportError:  # transformers 4: the slow, PIL-based CLIPImageProcessor
        from transformers import CLIPImageProcessor as processor_cls
    return processor_cls()


def _uint8_image(h: int, w: int, noise: float, seed: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 13.0), np.cos(yy / 7.0), np.sin((xx + yy) / 17.0)], -1) * 0.5 + 0.5
    noisy = base * 255 + np.random.default_rng(seed).normal(0.0, noise, (h, w, 3))
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _pixel_units(diff: torch.Tensor) -> torch.Tensor:
    """Normalised-space differences back to [0, 255] pixel units (times the per-channel std)."""
    return diff.abs() * torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255.0


@pytest.mark.parametrize("hw", [(224, 224), (256, 320), (300, 200), (100, 150), (48, 40)])
def test_clip_preprocess_matches_clip_image_processor(hw: tuple[int, int]) -> None:
    """Tolerance: exact (1e-5) without resize; else max 1.5/255 and mean 0.5/255 on smooth content.

    The residual comes from the resampling kernel (torch's bicubic uses a = -0.75, PIL's a = -0.5) and PIL's
    uint8 rounding of the resized image.
    """
    processor = _image_processor()
    array = _uint8_image(*hw, noise=0.0, seed=0)
    reference = processor(images=array, return_tensors="pt")["pixel_values"]
    ours = clip_preprocess(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255.0)
    assert ours.shape == reference.shape == (1, 3, 224, 224)
    assert ours.dtype == torch.float32
    diff = _pixel_units(ours - reference)
    if hw == (224, 224):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    else:
        assert diff.max() <= 1.5 and diff.mean() <= 0.5, (diff.max(), diff.mean())


def test_clip_preprocess_noisy_image_and_custom_size() -> None:
    """High-frequency content: kernels differ most, still ~1/255 on average (max a few levels)."""
    processor = _image_processor()
    array = _uint8_image(180, 260, noise=25.0, seed=1)
    reference = processor(images=array, return_tensors="pt")["pixel_values"]
    ours = clip_preprocess(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255.0)
    diff = _pixel_units(ours - reference)
    assert diff.mean() <= 1.0 and diff.max() <= 10.0, (diff.max(), diff.mean())
    # smaller model input size, batched, bf16 input: float32 out, every image handled alike
    batch = torch.rand(3, 3, 40, 64)
    out = clip_preprocess(batch.bfloat16(), size=IMAGE_SIZE)
    assert out.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE) and out.dtype == torch.float32
    torch.testing.assert_close(out[1:2], clip_preprocess(batch[1:2].bfloat16(), size=IMAGE_SIZE))


def test_parse_dtype() -> None:
    assert parse_dtype("fp32") is torch.float32 and parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("float16") is torch.float16 and parse_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="fp32"):
        parse_dtype("int8")


# --------------------------------------------------------------------------------------------------- hub


def test_fetch_file_local(tmp_path: Path) -> None:
    file = tmp_path / "weights.pth"
    file.write_bytes(b"x")
    assert fetch_file(str(file)) == file
    assert fetch_file(str(file), "ignored.pth") == file
    assert fetch_file(str(tmp_path), "weights.pth") == file
    with pytest.raises(FileNotFoundError, match="other.pth"):
        fetch_file(str(tmp_path), "other.pth")


def test_fetch_file_missing_repo_fails_fast_with_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as info:
        fetch_file("no-such-org/no-such-repo", "head.pth", cache_dir=tmp_path, config_key="head_source")
    assert time.monotonic() - start < 5.0
    message = str(info.value)
    assert "No network here?" in message
    assert "hf download no-such-org/no-such-repo head.pth" in message
    assert "the reward's `head_source` setting to a local path (training: reward.head_source=<path>" in message
    with pytest.raises(FileNotFoundError, match="hf download"):
        fetch_file("no-such-org/no-such-repo")  # a repo id without a file name


def test_missing_model_names_the_fix(tiny_clip_dir: Path) -> None:
    with pytest.raises(FileNotFoundError,
                       match=r"hf download no-such-org/no-such-clip.*`model` setting to a local path .training: "
                             r"reward.model="):
        build_reward("clip_score", model="no-such-org/no-such-clip", tokenizer=str(tiny_clip_dir))
    with pytest.raises(FileNotFoundError, match="`head_source` setting to a local path"):
        build_reward("aesthetic", clip_model=str(tiny_clip_dir), head_source="no-such-org/no-such-head")


# ------------------------------------------------------------------------------------ CLIP rewards: contract


def test_registered() -> None:
    assert {"aesthetic", "pickscore", "clip_score", "hpsv2", "imagereward", "multi"} <= set(available_rewards())


@pytest.mark.parametrize("name", CLIP_REWARDS)
def test_contract_shape_determinism_batch_invariance(
    name: str, fp32_rewards: dict[str, RewardModel], images: torch.Tensor
) -> None:
    reward = fp32_rewards[name]
    assert reward.name == name
    assert reward.requires_prompts == (name != "aesthetic")
    assert not reward.training and not any(p.requires_grad for p in reward.parameters())
    scores = reward(images, PROMPTS)
    assert scores.shape == (len(images),) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    assert torch.equal(scores, reward(images, PROMPTS))
    alone = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)
    assert scores.unique().numel() > 1  # different images score differently


@pytest.mark.parametrize("name", CLIP_REWARDS)
def test_bf16_model_close_to_fp32_and_bf16_input(
    name: str, fp32_rewards: dict[str, RewardModel], tiny_clip_dir: Path, head_path: Path, images: torch.Tensor
) -> None:
    reward = build_reward(name, dtype="bf16", **reward_kwargs(name, tiny_clip_dir, head_path))
    assert any(p.dtype == torch.bfloat16 for p in reward.parameters())
    scores = reward(images, PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (len(images),)
    reference = fp32_rewards[name](images, PROMPTS)
    scale = reference.abs().max().clamp(min=1.0)
    torch.testing.assert_close(scores, reference, atol=0.05 * scale.item(), rtol=0.0)  # loose: bf16 has 8 bits
    from_bf16 = fp32_rewards[name](images.bfloat16(), PROMPTS)  # bf16 images into an fp32 model
    assert from_bf16.dtype == torch.float32
    torch.testing.assert_close(from_bf16, fp32_rewards[name](images.bfloat16().float(), PROMPTS))


@pytest.mark.parametrize("name", ["pickscore", "clip_score"])
def test_prompts_matter(name: str, fp32_rewards: dict[str, RewardModel], images: torch.Tensor) -> None:
    reward = fp32_rewards[name]
    same_image = images[:1].expand(3, -1, -1, -1)
    scores = reward(same_image, ["a photo of a cat", "a red car", "blue sky"])
    assert scores.unique().numel() == 3


def test_pickscore_is_logit_scale_times_cosine(
    fp32_rewards: dict[str, RewardModel], reference_clip: CLIPModel, tiny_clip_dir: Path
) -> None:
    """Against CLIPImageProcessor + CLIPModel's own towers: images already at model size, so no resampling."""
    array = np.stack([_uint8_image(IMAGE_SIZE, IMAGE_SIZE, noise=30.0, seed=s) for s in range(3)])
    images = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0
    prompts = ["a photo of a cat", "a red car", "blue sky"]
    processor = _image_processor()
    pixels = processor(
        images=list(array),
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        return_tensors="pt",
    )["pixel_values"]
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_dir)
    cosine = reference_cosine(reference_clip, tokenizer, pixels, prompts)
    expected = reference_clip.logit_scale.exp().item() * cosine
    assert reference_clip.logit_scale.exp().item() == pytest.approx(np.exp(4.0), rel=1e-5)
    torch.testing.assert_close(fp32_rewards["pickscore"](images, prompts), expected, atol=1e-4, rtol=1e-5)


def test_clip_score_range_and_formula(
    fp32_rewards: dict[str, RewardModel], reference_clip: CLIPModel, tiny_clip_dir: Path, images: torch.Tensor
) -> None:
    reward = fp32_rewards["clip_score"]
    g = torch.Generator().manual_seed(5)
    many = torch.rand(12, 3, 36, 36, generator=g)
    prompts = [["a photo of a cat", "a red car", "blue sky", "a dog"][i % 4] for i in range(12)]
    scores = reward(many, prompts)
    assert ((scores >= 0) & (scores <= 100)).all()
    pixels = clip_preprocess(many, IMAGE_SIZE)
    cosine = reference_cosine(reference_clip, CLIPTokenizer.from_pretrained(tiny_clip_dir), pixels, prompts)
    torch.testing.assert_close(scores, 100.0 * cosine.clamp(min=0), atol=1e-4, rtol=1e-5)


def test_aesthetic_is_head_of_normalised_embedding(
    fp32_rewards: dict[str, RewardModel], reference_clip: CLIPModel, head_path: Path, images: torch.Tensor
) -> None:
    reward = fp32_rewards["aesthetic"]
    state = torch.load(head_path, weights_only=True)
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    head = nn.Sequential(
        nn.Linear(PROJECTION, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    ).eval()  # fmt: skip
    head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    with torch.no_grad():
        embedding = features(reference_clip.get_image_features(pixel_values=clip_preprocess(images, IMAGE_SIZE)))
        expected = head(embedding / embedding.norm(dim=-1, keepdim=True)).squeeze(-1)
    scores = reward(images, ["ignored"] * len(images))
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(scores, reward(images, ["prompts do not matter"] * len(images)))
    assert not hasattr(reward, "clip")  # the text tower was dropped


def test_aesthetic_head_formats(
    fp32_rewards: dict[str, RewardModel], tiny_clip_dir: Path, head_path: Path, images: torch.Tensor, tmp_path: Path
) -> None:
    reference = fp32_rewards["aesthetic"](images, PROMPTS)
    state = torch.load(head_path, weights_only=True)
    # .safetensors, a directory + file name, and keys of a bare nn.Sequential all load the same head
    save_file(state, tmp_path / "head.safetensors")
    torch.save({k.removeprefix("layers."): v for k, v in state.items()}, tmp_path / "bare.pth")
    for source, filename in [(tmp_path / "head.safetensors", None), (head_path.parent, head_path.name),
                             (tmp_path / "bare.pth", None)]:  # fmt: skip
        reward = build_reward(
            "aesthetic", clip_model=str(tiny_clip_dir), head_source=str(source), head_filename=filename
        )
        torch.testing.assert_close(reward(images, PROMPTS), reference)
    # a wrong head width fails at load (strict), a pickled object is refused rather than unpickled
    torch.save(AestheticHead(PROJECTION + 1).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_reward("aesthetic", clip_model=str(tiny_clip_dir), head_source=str(tmp_path / "wide.pth"))
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pth")
    with pytest.raises(RuntimeError, match="weights_only"):
        build_reward("aesthetic", clip_model=str(tiny_clip_dir), head_source=str(tmp_path / "pickled.pth"))


# -------------------------------------------------------------------------------------------------- multi


def test_multi_weighted_sum_and_components() -> None:
    g = torch.Generator().manual_seed(3)
    images = torch.cat([torch.rand(2, 3, 32, 32, generator=g), torch.full((1, 3, 32, 32), 0.4)])
    prompts = ["x", "y", "z"]
    multi = build_reward(
        "multi", components={"brightness": {"weight": 2.0}, "jpeg_compressibility": {"weight": -0.5, "quality": 80}}
    )
    assert not multi.requires_prompts
    bright = build_reward("brightness")(images, prompts)
    jpeg = build_reward("jpeg_compressibility", quality=80)(images, prompts)
    total = multi(images, prompts)
    assert total.shape == (3,) and total.dtype == torch.float32
    torch.testing.assert_close(total, 2.0 * bright - 0.5 * jpeg)
    assert set(multi.last_components) == {"brightness", "jpeg_compressibility"}
    torch.testing.assert_close(multi.last_components["brightness"], bright)
    torch.testing.assert_close(multi.last_components["jpeg_compressibility"], jpeg)
    # the list form, with labels for a reward used twice; prompt dependence propagates
    listed = build_reward(
        "multi",
        components=[
            {"name": "jpeg_compressibility", "label": "jpeg80", "weight": 1.0, "quality": 80},
            {"name": "jpeg_compressibility", "label": "jpeg10", "weight": 1.0, "quality": 10},
            {"name": "color_match", "weight": 0.0},
        ],
    )
    assert listed.requires_prompts
    total = listed(images, ["red", "blue", "green"])
    assert set(listed.last_components) == {"jpeg80", "jpeg10", "color_match"}
    torch.testing.assert_close(total, listed.last_components["jpeg80"] + listed.last_components["jpeg10"])
    with pytest.raises(ValueError, match="appears twice"):
        build_reward("multi", components=[{"name": "brightness"}, {"name": "brightness"}])
    with pytest.raises(ValueError, match="at least one"):
        build_reward("multi", components={})
    with pytest.raises(KeyError, match="no_such_reward"):
        build_reward("multi", components={"no_such_reward": {"weight": 1.0}})


def test_multi_holds_model_rewards_as_submodules(tiny_clip_dir: Path) -> None:
    multi = build_reward(
        "multi", components={"clip_score": {"weight": 0.01, "model": str(tiny_clip_dir)}, "brightness": {"weight": 1}}
    )
    assert multi.requires_prompts
    assert isinstance(multi.rewards, nn.ModuleDict) and "clip_score" in dict(multi.named_children())["rewards"]
    params = list(multi.parameters())
    assert params and not any(p.requires_grad for p in params)  # the sub-reward's weights are registered, frozen
    multi.to(torch.bfloat16)  # .to() reaches the components (a parent module's precision conversion)
    assert all(p.dtype == torch.bfloat16 for p in multi.rewards["clip_score"].parameters())
    images = torch.rand(2, 3, 32, 32)
    total = multi(images, ["a cat", "a dog"])
    assert total.dtype == torch.float32 and torch.isfinite(total).all()
    expected = 0.01 * multi.last_components["clip_score"] + multi.last_components["brightness"]
    torch.testing.assert_close(total, expected)


# ---------------------------------------------------------------------------------------- optional extras


@pytest.mark.parametrize(
    ("name", "module", "extra"),
    [("hpsv2", "open_clip", "hpsv2"), ("imagereward", "ImageReward", "imagereward")],
)
def test_missing_optional_dependency_message(name: str, module: str, extra: str, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import <module>` raise, installed or not
    with pytest.raises(ImportError) as info:
        build_reward(name)
    assert f'pip install -e ".[{extra}]"' in str(info.value)


class _FakeOpenClipModel(nn.Module):
    """Stands in for an OpenCLIP model: ``visual`` with size/mean/std, ``encode_image``/``encode_text``."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.Flatten(), nn.Linear(8 * 4 * 4, 8))
        self.visual.image_size = (IMAGE_SIZE, IMAGE_SIZE)
        self.visual.image_mean, self.visual.image_std = CLIP_MEAN, CLIP_STD
        self.token_embedding = nn.Embedding(128, 8)
        self.logit_scale = nn.Parameter(torch.tensor(4.6))

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = self.visual(pixels)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = self.token_embedding(tokens).mean(dim=1)
        return F.normalize(out, dim=-1) if normalize else out


def _fake_tokenize(texts: list[str]) -> torch.Tensor:
    out = torch.zeros(len(texts), 77, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [ord(c) % 128 for c in text][:77]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


@pytest.fixture
def fake_open_clip(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    fake = types.ModuleType("open_clip")

    def create_model(name: str, pretrained=None):
        assert pretrained is None  # never downloads the LAION weights
        return _FakeOpenClipModel()

    fake.create_model = create_model
    fake.get_tokenizer = lambda name: _fake_tokenize
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    return fake


def test_hpsv2_wiring_with_stand_in_open_clip(fake_open_clip, tmp_path: Path, images: torch.Tensor) -> None:
    torch.manual_seed(7)
    trained = _FakeOpenClipModel().eval()
    # the HPS checkpoint layout: {"state_dict": ...}, here with DDP's "module." prefix too
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "hps.pt")
    reward = build_reward("hpsv2", checkpoint_source=str(tmp_path / "hps.pt"))
    scores = reward(images, PROMPTS)
    assert scores.shape == (len(images),) and scores.dtype == torch.float32
    with torch.no_grad():
        img = trained.encode_image(clip_preprocess(images, IMAGE_SIZE), normalize=True)
        txt = trained.encode_text(_fake_tokenize(PROMPTS), normalize=True)
    torch.testing.assert_close(scores, (img * txt).sum(-1), atol=1e-5, rtol=1e-5)  # cosine, no logit scale
    alone = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)
    # the version picks the file inside a directory; pickled objects are refused, not unpickled
    (tmp_path / "HPS_v2_compressed.pt").write_bytes((tmp_path / "hps.pt").read_bytes())
    other = build_reward("hpsv2", version="v2.0", checkpoint_source=str(tmp_path))
    torch.testing.assert_close(other(images, PROMPTS), scores)
    torch.save({"state_dict": trained.state_dict(), "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pt")
    with pytest.raises(RuntimeError, match="weights_only"):
        build_reward("hpsv2", checkpoint_source=str(tmp_path / "pickled.pt"))
    with pytest.raises(ValueError, match="v2.1"):
        build_reward("hpsv2", version="v3")


class _Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class _FakeBlip(nn.Module):
    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        # patch embedding -> image tokens [B, N, 8], what BLIP's ViT hands the text encoder
        self.visual_encoder = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.Flatten(2), _Transpose())
        self.embed = nn.Embedding(len(tokenizer), 8)

    def text_encoder(self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, return_dict):
        assert return_dict and encoder_attention_mask.shape == encoder_hidden_states.shape[:-1]
        hidden = self.embed(input_ids) * attention_mask[..., None] + encoder_hidden_states.mean(1, keepdim=True)
        return types.SimpleNamespace(last_hidden_state=hidden)


def test_imagereward_wiring_with_stand_in_package(monkeypatch, images: torch.Tensor) -> None:
    tokenizer = build_clip_tokenizer(WORDS)
    torch.manual_seed(8)
    model = nn.Module()
    model.blip = _FakeBlip(tokenizer)
    model.mlp = nn.Linear(8, 1)
    model.mean, model.std = 0.5, 2.0
    calls = []
    fake = types.ModuleType("ImageReward")
    fake.load = lambda *args: calls.append(args) or model
    monkeypatch.setitem(sys.modules, "ImageReward", fake)

    reward = build_reward("imagereward", image_size=IMAGE_SIZE)
    assert calls == [("ImageReward-v1.0", "cpu", None, None)]
    scores = reward(images, PROMPTS)
    assert scores.shape == (len(images),) and scores.dtype == torch.float32
    with torch.no_grad():
        tok = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        states = model.blip.visual_encoder(clip_preprocess(images, IMAGE_SIZE))
        hidden = model.blip.embed(tok["input_ids"]) * tok["attention_mask"][..., None] + states.mean(1, keepdim=True)
        expected = (model.mlp(hidden[:, 0]).squeeze(-1) - 0.5) / 2.0
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    alone = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_clip_rewards_follow_to_cuda(tiny_clip_dir: Path, head_path: Path, images: torch.Tensor) -> None:
    for name in CLIP_REWARDS:
        reward = build_reward(name, **reward_kwargs(name, tiny_clip_dir, head_path))
        cpu_scores = reward(images, PROMPTS)
        reward.to("cuda")
        gpu_scores = reward(images.cuda(), PROMPTS)
        assert gpu_scores.device.type == "cuda" and gpu_scores.dtype == torch.float32
        torch.testing.assert_close(gpu_scores.cpu(), cpu_scores, atol=1e-3, rtol=1e-3)
