"""Shared test setup: offline, single-threaded-friendly, one tiny pipeline built per session."""

from __future__ import annotations

import csv
import os
import signal
import sys
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
MAX_WORKERS = 4  # `-n auto` on a big machine: more workers than this mostly add start-up time and memory


def threads_per_worker() -> int:
    """Torch threads for this test process: the cores shared out over pytest-xdist's workers (at most 2 each; tiny
    models gain little from more). Two processes that each take every core slow each other badly."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, (os.cpu_count() or 1) // workers))


THREADS = threads_per_worker()
torch.set_num_threads(THREADS)
if "PYTEST_XDIST_WORKER" in os.environ:
    # Subprocesses (the CLI tests) start torch with this worker's share of the cores, not the value the controller
    # passed down: two threads per process next to other busy processes double a run's time on 2 cores.
    os.environ["OMP_NUM_THREADS"] = str(THREADS)


@pytest.hookimpl(optionalhook=True)  # a machine without pytest-xdist runs `pytest -o addopts=""` in one process
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``--dist loadgroup``): the tests of a module that share a module-scoped fixture run on
    one worker, so the fixture (a DDP run, a trained checkpoint) is built once; every other test goes where there is
    room. Tests marked ``slow`` start first, so that no worker begins a minutes-long one when the rest are done; a
    slow test of such a group takes its whole group along, in file order: split apart, the group's fixtures were
    torn down in between and built again (the 2-process DDP run twice, ~40 s each)."""
    def unit(item: pytest.Item) -> str:
        fixture_info = getattr(item, "_fixtureinfo", None)
        defs = fixture_info.name2fixturedefs.values() if fixture_info else []
        return item.module.__name__ if any(d[-1].scope == "module" for d in defs if d) else item.nodeid

    units = {item.nodeid: unit(item) for item in items}
    slow_units = {units[item.nodeid] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: units[item.nodeid] not in slow_units)  # stable: otherwise in file order
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if units[item.nodeid] != item.nodeid:
            item.add_marker(pytest.mark.xdist_group(units[item.nodeid]))


@pytest.fixture(autouse=True)
def keep_sigint(request: pytest.FixtureRequest):
    """Each test leaves Ctrl-C's handler as it found it: Lightning ignores SIGINT after a Ctrl-C (SIG_IGN) and
    Lightning's DDP teardown resets it to SIG_DFL, and a later test of Ctrl-C on the same worker would then not stop
    (or the worker would die). A test that changed it is named in a warning."""
    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if before is not None and after != before:
        warnings.warn(f"{request.node.nodeid} left SIGINT's handler as {after!r}: put back", stacklevel=1)
        signal.signal(signal.SIGINT, before)


REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(REPO / "conf")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tiny pipelines are built once for the whole session (also exported for subprocesses)."""
    path = tmp_path_factory.mktemp("sdpo-cache")
    os.environ["SDPO_CACHE"] = str(path)
    return path


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch):
    """``downloads(allowed)`` sets whether Hugging Face may download, as HF_HUB_OFFLINE does (the tests run with
    HF_HUB_OFFLINE=1, which huggingface_hub reads once, at import)."""
    import huggingface_hub.constants

    return lambda allowed: monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", not allowed)


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo: str, files: list[str], revision: str = "main") -> None:
    """``repo`` at ``revision`` as ``hf download`` leaves it in the Hugging Face cache ``cache``: refs/<revision>
    names a commit, whose snapshots/<commit>/ folder holds the files (empty here: only their presence is read)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / revision).write_text(HUB_COMMIT)
    for name in files:
        (folder / "snapshots" / HUB_COMMIT / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / HUB_COMMIT / name).write_text("{}")


@pytest.fixture
def hub_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """An empty Hugging Face cache in place of the default one; ``hub_cache(repo, files)`` puts files in it."""
    import huggingface_hub.constants

    cache = tmp_path_factory.mktemp("hf-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return lambda repo, files: cache_repo(cache, repo, files)


def build_tiny_clip(folder: Path, words: list[str], image_size: int = 32, projection: int = 16) -> Path:
    """A random tiny CLIPModel + CLIP tokenizer saved like a hub repo: what CLIP-based rewards load in tests."""
    from transformers import CLIPConfig, CLIPModel

    from sdpo.policy.tokenizer import build_clip_tokenizer, save_tokenizer

    tokenizer = build_clip_tokenizer(words)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection))
        with torch.no_grad():
            model.logit_scale.fill_(4.0)  # exp ~ 54.6, away from the init value so scale tests mean something
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return folder


def build_aesthetic_head(path: Path, projection: int = 16) -> Path:
    """A random LAION aesthetic head saved as the original ``.pth`` (a state dict keyed ``layers.N.*``)."""
    from sdpo.rewards.clip_based import AestheticHead

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        torch.save(AestheticHead(projection).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_reward_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny stand-ins for the CLIP-based reward models, for end-to-end runs of the real-model experiments."""
    clip = build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), ["a", "photo", "of", "cat", "dog"])
    head = build_aesthetic_head(tmp_path_factory.mktemp("head") / "aesthetic_head.pth")
    return {"clip": clip, "head": head}


def compose(overrides: list[str], output_dir: Path, cache_dir: Path, config_name: str = "train"):
    """The config exactly as ``python -m sdpo.<config_name> <overrides>`` composes it (``train`` or ``evaluate``),
    writing into ``output_dir``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(
            config_name,
            overrides=[f"paths.output_dir={output_dir}", f"paths.cache_dir={cache_dir}", *overrides],
        )


def compose_eval(overrides: list[str], output_dir: Path, cache_dir: Path):
    """The evaluation config exactly as ``python -m sdpo.evaluate <overrides>`` composes it (no progress bar)."""
    return compose(["progress=false", *overrides], output_dir, cache_dir, "evaluate")


class _ZeroGradient(torch.autograd.Function):
    """The identity, whose backward returns zeros."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad)


def _zero_gradient_backend() -> str:
    """A torch.compile backend whose graphs compute the right outputs and pass back zero gradients, as both compiler
    failures met here did (torch 2.11's dynamo with the fused LoRA layers; torch 2.13's inductor layout
    optimization). It runs the captured graph eagerly: no tracing through AOT autograd, no compile time."""
    name = "sdpo_test_zero_gradients"

    def backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        def run(*args: object) -> object:
            outputs = graph.forward(*args)
            zeroed = [_ZeroGradient.apply(o) if isinstance(o, torch.Tensor) and o.requires_grad else o
                      for o in outputs]
            return type(outputs)(zeroed)

        return run

    if name not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(name=name)(backend)
    return name


ZERO_GRADIENT_BACKEND = _zero_gradient_backend()

# Small and fast: a few prompts, the default tiny model; progress bars off to keep logs short.
FAST = [
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.prompts_per_batch=4",
    "algo.micro_batch_pairs=2",
]


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The CSV logger's rows of a run folder, empty cells dropped."""
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    return [{k: float(v) for k, v in r.items() if v != ""} for r in rows]


def trainable_state(module) -> dict[str, torch.Tensor]:
    """Copies of a module's trainable weights, by name."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def assert_weights_match(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float,
                         label: str = "") -> None:
    """Every weight of ``actual`` within ``atol`` of ``expected``'s (no relative slack), failing with its name."""
    for name, value in actual.items():
        where = f"{label} {name}".strip()
        torch.testing.assert_close(value, expected[name], rtol=0, atol=atol, msg=lambda m, where=where: f"{where}: {m}")


def console_script(name: str) -> Path:
    """The installed console script ``name`` (pyproject's ``[project.scripts]``) next to this interpreter."""
    script = Path(sys.executable).parent / name
    assert script.is_file(), f"{script} is missing: install the package (pip install -e .) to get its commands"
    return script
