"""algo.overlap_scoring: chunks scored on a worker thread (CUDA: a side stream) while the next chunk samples give
the rewards and the update of scoring after sampling, and the VAE runs outside the policy's autocast on the worker
as in line."""

from __future__ import annotations

import threading

import pytest
import torch
from lightning.pytorch import Callback

from sdpo.config_checks import ConfigError, validate_config
from sdpo.overlap import BackgroundScorer
from sdpo.policy.conditioning import encode_prompts
from sdpo.policy.loading import TinySpec, ensure_tiny_pipeline, load_components
from sdpo.policy.rollout import PairTrajectories, sample_pair_chunks
from sdpo.policy.steps import make_scheduler, timestep_schedule
from sdpo.scoring import PairRewards, score_pairs
from sdpo.train_run import train
from tests.conftest import FAST, assert_weights_match, compose, read_metrics, trainable_state

# 4 pairs in chunks of 2; random anchors (keyed by global trajectory index, so a chunk must know where it starts);
# decode batches of 5 = one chunk's 2 x (3 + 3 - 1) queries split evenly, so both runs decode identical batches
BASE = [*FAST, "model.lora.enabled=true", "optim.lr=0.1", "optim.eps=1.0", "trainer.max_epochs=2",
        "++callbacks.eval=null", "algo.sample_batch_size=2", "algo.dense.anchor=random", "algo.decode_batch_size=5",
        "trainer.precision=bf16-mixed"]


class DecodeProbe(Callback):
    """Records, for every VAE decode during training, the thread it ran on and whether CPU autocast was on."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    @staticmethod
    def of(trainer) -> DecodeProbe:
        return next(c for c in trainer.callbacks if isinstance(c, DecodeProbe))

    def on_train_start(self, trainer, pl_module) -> None:
        def record(module, args) -> None:
            self.calls.append((threading.current_thread().name, torch.is_autocast_enabled("cpu")))

        pl_module.vae.decoder.register_forward_pre_hook(record)


def test_overlapped_scoring_equals_scoring_after_sampling(tmp_path, cache_dir, caplog):
    runs = {}
    for overlap in (False, True):
        overrides = [*BASE, f"algo.overlap_scoring={str(overlap).lower()}",
                     f"+callbacks.decodes._target_={__name__}.DecodeProbe"]
        trainer = train(compose(overrides, tmp_path / str(overlap), cache_dir))
        runs[overlap] = (trainable_state(trainer.lightning_module), read_metrics(tmp_path / str(overlap)),
                         DecodeProbe.of(trainer))
    (plain, plain_rows, plain_probe), (overlapped, rows, probe) = runs[False], runs[True]
    assert caplog.text.count("algo.overlap_scoring on CPU") == 1  # said once, for the overlapped run
    assert probe.calls and {name.startswith("sdpo-scoring") for name, _ in probe.calls} == {True}
    assert {name.startswith("sdpo-scoring") for name, _ in plain_probe.calls} == {False}
    # the run is bf16-mixed, but the VAE runs in its own dtype, on the worker as in line
    assert not any(autocast for _, autocast in probe.calls + plain_probe.calls)
    for row, plain_row in zip(rows, plain_rows, strict=True):
        for key in ("train/reward_1step", "train/reward_last", "train/reward_queries", "train/loss"):
            assert row[key] == pytest.approx(plain_row[key], abs=1e-6), key
        assert row["time/decode"] > 0 and row["time/reward_model"] > 0
    assert max(float(v.abs().max()) for n, v in plain.items() if "lora_B" in n) > 1e-2  # it trained
    assert_weights_match(overlapped, plain, atol=1e-6)


def test_overlap_without_a_second_chunk_is_refused(tmp_path, downloads):
    downloads(True)  # the reference experiment's models would download (offline they must be cached first)
    cfg = compose(["data.prompts_per_batch=4", "algo.overlap_scoring=true"], tmp_path, tmp_path)
    with pytest.raises(ConfigError, match=r"algo.sample_batch_size=4 covers all 4 prompts of an iteration.*e\.g\. 2"):
        validate_config(cfg)
    validate_config(compose(["data.prompts_per_batch=4", "algo.overlap_scoring=true", "algo.sample_batch_size=3"],
                            tmp_path, tmp_path))
    # the reference experiment: 8 prompts x 4 sampling batches per iteration, so chunks of 16 leave a second one
    validate_config(compose(["+experiment=sd_turbo_aesthetic", "algo.overlap_scoring=true",
                             "algo.sample_batch_size=16", "trainer.accelerator=cpu", "trainer.precision=bf16-mixed"],
                            tmp_path, tmp_path))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_background_scorer_on_each_device(device, tmp_path):
    """The scorer alone: the same rewards as scoring each chunk in line, chunk order kept. On CUDA the side stream
    must wait for sampling and the caller for scoring; a missing wait reads half-written latents or rewards."""
    device = torch.device(device)
    words = ["cat", "dog", "red"]
    parts = load_components(str(ensure_tiny_pipeline(tmp_path, TinySpec(latent_size=8, words=words))))
    for network in (parts.unet, parts.vae, parts.text_encoder):
        network.to(device)
    scheduler = make_scheduler(parts.scheduler_config, "trailing")
    timesteps = timestep_schedule(scheduler, 4)
    prompts = ["cat", "dog", "red cat", "red dog", "dog cat", "red"]
    cond = encode_prompts(parts, prompts)

    def chunks():
        return sample_pair_chunks(parts.unet, scheduler, prompts, cond, timesteps, (4, 8, 8), 1.0,
                                  [torch.Generator(device).manual_seed(p) for p in range(len(prompts))],
                                  unet_batch_size=2)

    def score(chunk: PairTrajectories, timings: dict[str, float], first_pair: int) -> PairRewards:
        generators = [torch.Generator().manual_seed(2 * first_pair + i) for i in range(2 * chunk.num_pairs)]
        return score_pairs(chunk, parts.vae, parts.latent_scale, lambda images, _: images.mean(dim=(1, 2, 3)),
                           "random", 1, False, generators, batch_size=5, timings=timings)

    first, expected = 0, []
    for chunk in chunks():
        expected.append(score(chunk, {}, first))
        first += chunk.num_pairs
    with BackgroundScorer(score, device) as scorer:
        first = 0
        for chunk in chunks():
            scorer.submit(chunk, first)
            first += chunk.num_pairs
        got = scorer.results()
    want = PairRewards.concat(expected)
    assert got.num_queries == want.num_queries == 6 * 5
    torch.testing.assert_close(got.dense, want.dense, rtol=0, atol=1e-6)
    assert torch.equal(got.query_steps, want.query_steps)
    torch.testing.assert_close(got.last_images, want.last_images, rtol=0, atol=1e-6)
    assert scorer.timings["decode"] > 0
