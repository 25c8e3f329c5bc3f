"""Lightning DDP on CPU (gloo), 2 processes: equal to 1 process on the same global batch, rank-0-only outputs,
a two-node launch on localhost, and resume of a distributed checkpoint in 1 process.

The 2-process runs go through the real entry point (``python -m sdpo.train trainer=ddp ...``) as subprocesses,
one torch thread per process (two processes on two cores otherwise slow each other down badly). A test-only
callback (``rank_probe.RankProbe``) saves every rank's prompts, images, tracker and weights after each iteration.

How the 1-process reference sees the same global batch: 2 x 4 prompts per iteration (data.py gives rank r the slice
r of one global draw), the same sampling and decode batch shapes as one rank (so every pair is computed
identically; the reference scores its first 4 pairs in the background while the next 4 sample, and random query
anchors keyed by global trajectory index make both chunks draw what the two ranks draw), ``algo.shuffle_shards=2``
and a 2x micro-batch (so each micro-batch holds exactly the pairs that the two ranks train together; DDP's
gradient average is its mean). AdamW runs with ``eps=1``: with the usual 1e-8,
Adam's m/sqrt(v) turns rounding noise in near-zero gradients (summed in another order by the all-reduce) into
full ±lr steps; with eps=1 the update is a smooth function of the gradient and the comparison is tight. For the
same reason the pessimistic clip is opened (``algo.clip_range=1e6``): its gradient switches off where a new log-prob
crosses old ± ε, and a 1-pair and a 2-pair training forward round log-probs ~1e-7 apart, so one transition within
that of the edge flips (seen: identical samples and trackers, LoRA weights 7.5e-5 apart after one iteration). The
clip is elementwise, so DDP cannot change it; ``tests/unit/test_losses.py`` tests it on hand-computed cases.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdpo.train import LaunchError, launch_overrides
from sdpo.train_run import train
from tests.conftest import REPO, assert_weights_match, compose, console_script, read_metrics

EPOCHS = 2  # iterations of the 2-process run
COMMON = [
    "model.lora.enabled=true", "optim.lr=0.1", "optim.eps=1.0", "algo.tracker.min_count=2",
    "algo.tracker.buffer_size=4", "algo.decode_batch_size=4", "algo.gradient_accumulation_steps=2",
    "algo.dense.anchor=random", "algo.clip_range=1e6",  # see the module docstring
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "++callbacks.eval=null",
]
PER_RANK = ["data.prompts_per_batch=4", "algo.micro_batch_pairs=1"]  # 4 pairs, optimizer steps of 2 x 1 pairs
ONE_PROCESS = ["data.prompts_per_batch=8", "algo.sample_batch_size=4", "algo.micro_batch_pairs=2",
               "algo.shuffle_shards=2",  # the same global batch and micro-batches in one process
               "algo.overlap_scoring=true"]  # each rank's 4 pairs scored while the next 4 sample: the same pairs


def probe(dirpath: Path) -> list[str]:
    return ["+callbacks.probe._target_=tests.integration.rank_probe.RankProbe", f"+callbacks.probe.dirpath={dirpath}"]


def launch_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "SDPO_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "SDPO_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if key not in extra:
            env.pop(key, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(dirpath: Path, rank: int, epoch: int) -> dict:
    return torch.load(dirpath / f"rank{rank}_epoch{epoch}.pt", weights_only=False)


def assert_weights_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys() and any("lora" in k for k in a)
    assert_weights_match(a, b, atol)


@pytest.fixture(scope="module")
def one_thread():
    """The in-process reference runs with one thread like each rank: a float sum's order follows the threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, cache_dir) -> Path:
    """`python -m sdpo.train trainer=ddp` on 2 CPU processes, started from a scratch folder with no run folder
    given: the run folder is Hydra's default, and rank 1 must write into rank 0's."""
    cwd = tmp_path_factory.mktemp("ddp")
    args = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"trainer.max_epochs={EPOCHS}",
            *COMMON, *PER_RANK, *probe(cwd / "probe")]
    result = subprocess.run([sys.executable, "-m", "sdpo.train", *args], cwd=cwd, env=launch_env(cache_dir),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir, one_thread) -> Path:
    """One process, the same global batch, one iteration more than the 2-process run (for the resume test)."""
    out = tmp_path_factory.mktemp("reference")
    train(compose([*COMMON, *ONE_PROCESS, f"trainer.max_epochs={EPOCHS + 1}", *probe(out / "probe")], out, cache_dir))
    return out


def run_folder(ddp_cwd: Path) -> Path:
    runs = [p for p in (ddp_cwd / "outputs" / "train").iterdir()]
    assert len(runs) == 1, runs  # rank 1 did not create a run folder of its own
    return runs[0]


def test_two_processes_equal_one_process(ddp_run, reference):
    """Prompts, noise (1-step images), tracker and LoRA weights after every iteration: 2 processes == 1."""
    for epoch in range(EPOCHS):
        ranks = [load(ddp_run / "probe", r, epoch) for r in (0, 1)]
        ref = load(reference / "probe", 0, epoch)
        assert [r["world_size"] for r in ranks] == [2, 2] and ref["world_size"] == 1
        assert ranks[0]["prompts"] + ranks[1]["prompts"] == ref["prompts"]
        images = torch.cat([r["first_images"] for r in ranks])
        torch.testing.assert_close(images, ref["first_images"], rtol=0, atol=1e-5)
        assert_weights_close(ranks[0]["weights"], ranks[1]["weights"], atol=0)  # DDP keeps the ranks in step
        assert_weights_close(ranks[0]["weights"], ref["weights"], atol=1e-6)
        moved = max(float(w.abs().max()) for n, w in ref["weights"].items() if "lora_B" in n)  # B starts at 0
        assert moved > 1e-2  # the comparison is 10^4 x tighter than the updates
        assert ranks[0]["total_queries"] == ranks[1]["total_queries"] == ref["total_queries"]


@pytest.mark.slow
def test_compiled_unet_under_ddp_equals_one_eager_process(reference, tmp_path, cache_dir):
    """A compiled UNet inside Lightning's DDP wrapper still all-reduces its LoRA gradients, its compile check included:
    2 processes with the whole UNet compiled train the weights of one eager process (aot_eager: dynamo and AOT
    autograd, no kernel builds). Whole rather than regional: one graph per batch shape instead of one per block
    shape, half the time; regional blocks are checked against eager in tests/unit/test_accumulation.py.

    Started through the console script ``sdpo-train``: Lightning re-launches rank 1 with the script's path instead
    of ``-m sdpo.train``."""
    args = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"trainer.max_epochs={EPOCHS}",
            "algo.compile=true", "algo.compile_backend=aot_eager", *COMMON, *PER_RANK,
            *probe(tmp_path / "probe"), f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run([console_script("sdpo-train"), *args], cwd=tmp_path, env=launch_env(cache_dir),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for log_file in (tmp_path / "run").glob("*.log"):  # rank 0's and rank 1's Hydra logs
        text = log_file.read_text()
        assert "torch.compile (aot_eager)" in text, log_file.name
        # every rank checked its compiled gradients against eager ones (algo.compile_check) without disturbing
        # the all-reduce, as the weights below show
        assert "compile check 1: compiled gradients of" in text, log_file.name
    assert len(list((tmp_path / "run").glob("*.log"))) == 2
    for epoch in range(EPOCHS):
        ranks = [load(tmp_path / "probe", r, epoch) for r in (0, 1)]
        assert_weights_close(ranks[0]["weights"], ranks[1]["weights"], atol=0)
        assert_weights_close(ranks[0]["weights"], load(reference / "probe", 0, epoch)["weights"], atol=1e-5)


def test_ranks_draw_distinct_prompts_and_noise_and_share_the_tracker(ddp_run, reference):
    for epoch in range(EPOCHS):
        r0, r1 = load(ddp_run / "probe", 0, epoch), load(ddp_run / "probe", 1, epoch)
        assert r0["prompts"] != r1["prompts"]
        # every pair's 1-step image differs from every pair's on the other rank, same prompt or not: own noise
        distance = (r0["first_images"][:, None] - r1["first_images"][None]).abs().flatten(2).amax(-1)  # [4, 4]
        assert bool((distance > 1e-3).all())
        assert r0["tracker"] == r1["tracker"]  # identical on every rank, not merely close
        ref, mine = load(reference / "probe", 0, epoch)["tracker"]["buffers"], r0["tracker"]["buffers"]
        assert [(b["prompt"], b["step"]) for b in ref] == [(b["prompt"], b["step"]) for b in mine]
        for a, b in zip(ref, mine, strict=True):
            assert a["values"] == pytest.approx(b["values"], abs=1e-5)


def test_only_rank_zero_writes(ddp_run):
    run = run_folder(ddp_run)
    names = sorted(p.name for p in run.iterdir())
    assert names == [".hydra", "checkpoints", "csv", "samples", "summary.json", "train.log",
                     "train_node0_local1.log", "trained"], names
    assert sorted(p.name for p in (run / "csv").iterdir()) == ["hparams.yaml", "metrics.csv"]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(ckpts) == 2 and ckpts[0].startswith(f"epoch={EPOCHS - 1}-step=") and ckpts[1] == "last.ckpt", ckpts
    assert (run / "checkpoints" / "last.ckpt").resolve() == (run / "checkpoints" / ckpts[0]).resolve()  # a link
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))  # one row per iteration, from rank 0 only
    assert rows[-1]["train/samples"] == EPOCHS * 2 * 4 * 2  # counted over both ranks
    assert rows[-1]["train/reward_queries"] == EPOCHS * 2 * 4 * 5  # 2 ranks x 4 pairs x (3 + 3 - 1 shared)


def test_two_node_launch_on_localhost(ddp_run, tmp_path, cache_dir):
    """num_nodes=2, devices=1: one process per "node" with the variables a cluster gives (MASTER_ADDR, MASTER_PORT,
    NODE_RANK, WORLD_SIZE; Lightning's default cluster environment). Equal to the 1-node, 2-device run."""
    port = str(free_port())
    args = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2",
            "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}", *COMMON, *PER_RANK, *probe(tmp_path / "probe")]
    nodes = [subprocess.Popen([sys.executable, "-m", "sdpo.train", *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=launch_env(cache_dir, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                             NODE_RANK=str(node), WORLD_SIZE="2"))
             for node in (0, 1)]
    results = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, results, strict=True):
        assert node.returncode == 0, err[-3000:]
    for rank in (0, 1):
        multi_node, single_node = load(tmp_path / "probe", rank, 0), load(ddp_run / "probe", rank, 0)
        assert multi_node["world_size"] == 2 and multi_node["prompts"] == single_node["prompts"]
        assert_weights_close(multi_node["weights"], single_node["weights"], atol=0)
    assert sorted(p.name for p in (tmp_path / "run").glob("*.log")) == ["train.log", "train_node1_local0.log"]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_resume_a_distributed_checkpoint_in_one_process(ddp_run, reference, tmp_path, cache_dir, one_thread):
    """The 2-process run's checkpoint continues in 1 process (same global batch) exactly like the 1-process run."""
    ckpt = run_folder(ddp_run) / "checkpoints" / "last.ckpt"
    out = tmp_path / "resumed"
    trainer = train(compose([*COMMON, *ONE_PROCESS, f"trainer.max_epochs={EPOCHS + 1}", f"ckpt_path={ckpt}",
                             *probe(out / "probe")], out, cache_dir))
    assert [r["epoch"] for r in read_metrics(out)] == [EPOCHS]  # it continued, nothing was re-run
    resumed, ref = load(out / "probe", 0, EPOCHS), load(reference / "probe", 0, EPOCHS)
    assert resumed["prompts"] == ref["prompts"] and resumed["total_queries"] == ref["total_queries"]
    assert_weights_close(resumed["weights"], ref["weights"], atol=2e-6)
    assert trainer.lightning_module.tracker.stats()["num_keys"] > 0


def test_launch_overrides():
    """Processes started by a launcher share one run folder; only rank 0 writes the config copy."""
    assert launch_overrides([], {}) == []
    lightning_child = {"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2"}
    assert launch_overrides(["hydra.run.dir=x"], lightning_child) == ["hydra.output_subdir=null",
                                                                       "hydra.job.name=train_node0_local1"]
    with pytest.raises(LaunchError, match="hydra.run.dir"):
        launch_overrides([], {"NODE_RANK": "1", "WORLD_SIZE": "2"})
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "42"}
    assert launch_overrides([], slurm) == ["hydra.run.dir=outputs/${task_name}/slurm-42"]
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "TORCHELASTIC_RUN_ID": "exp1"}
    assert launch_overrides([], torchrun) == ["hydra.run.dir=outputs/${task_name}/torchrun-exp1",
                                              "hydra.output_subdir=null", "hydra.job.name=train_rank_3"]


def test_a_rank_0_failure_stops_the_other_ranks_instead_of_leaving_them_waiting(tmp_path, cache_dir):
    """Rank 1 would wait for rank 0 in its next collective until the process group's timeout (30 minutes), and
    hold the pipes this test reads, so without the stop this run would outlast the test's timeout."""
    args = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=3", *COMMON,
            *PER_RANK, "+callbacks.fail._target_=tests.integration.rank_probe.FailOnRank", "+callbacks.fail.rank=0",
            "+callbacks.fail.epoch=1"]
    result = subprocess.run([sys.executable, "-m", "sdpo.train", *args], cwd=tmp_path, env=launch_env(cache_dir),
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "rank 0 failed alone" in result.stderr
    assert "stopped the 1 other local process(es) of the run" in result.stdout
    assert "run stopped (RuntimeError during epoch 1)" in result.stdout + result.stderr  # rank 0's report came


def test_a_failure_on_another_rank_still_says_what_was_kept_and_how_to_continue(tmp_path, cache_dir):
    """Lightning's watchdog stops rank 0 within seconds when a rank it started fails, before rank 0 can report: the
    failed rank gives the stop notice, naming the last complete checkpoint and its own log with the error, and the
    command exits with that rank's status."""
    args = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=3", *COMMON,
            *PER_RANK, "+callbacks.fail._target_=tests.integration.rank_probe.FailOnRank", "+callbacks.fail.rank=1",
            "+callbacks.fail.epoch=1", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run([sys.executable, "-m", "sdpo.train", *args], cwd=tmp_path, env=launch_env(cache_dir),
                            capture_output=True, text=True, timeout=180)
    assert "rank 1 failed alone" in result.stderr
    assert result.returncode == 1, result.returncode  # rank 1's status, not 137 (Lightning's SIGKILL of rank 0)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert f"run stopped (RuntimeError on rank 1 during epoch 1); newest checkpoint: {checkpoint} (epoch=0-" \
        in result.stdout, result.stdout[-2000:]
    assert f"continue: the same command with ckpt_path={checkpoint}" in result.stdout
    rank_log = tmp_path / "run" / "train_node0_local1.log"
    assert f"this rank's log (the error): {rank_log}" in result.stdout
    assert "rank 1 failed alone" in rank_log.read_text() and "run stopped" in rank_log.read_text()


@pytest.mark.parametrize("trainer", [["trainer=ddp", "trainer.accelerator=cpu"], ["trainer.accelerator=cpu"]])
def test_multirun_refuses_jobs_of_several_processes(tmp_path, cache_dir, trainer):
    """Lightning would re-launch rank 1 with the sweep's command line: one job per sweep point instead. The default
    trainer with trainer.devices=2 is DDP too (its strategy: auto), and its rank 1 ran the sweep a second time."""
    args = ["-m", *trainer, "trainer.devices=2", "algo.num_steps=3,4", f"hydra.sweep.dir={tmp_path}"]
    result = subprocess.run([sys.executable, "-m", "sdpo.train", *args], cwd=REPO, env=launch_env(cache_dir),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "one job per sweep point" in result.stderr
    assert "trainer.devices=2" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["multirun.yaml"]  # the refused point left no folder


def test_a_refused_sweep_in_a_folder_hydra_named_leaves_nothing(tmp_path, cache_dir):
    args = ["-m", "trainer.accelerator=cpu", "trainer.devices=2", "algo.num_steps=3,4"]
    result = subprocess.run([sys.executable, "-m", "sdpo.train", *args], cwd=tmp_path, env=launch_env(cache_dir),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "one job per sweep point" in result.stderr
    assert not list((tmp_path / "outputs").glob("*/*")), list(tmp_path.rglob("*"))  # no sweep folder, no point
