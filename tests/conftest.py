"""Shared fixtures: the default model, tiny random-weight models, and reference runs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Everything conserve and Hugging Face cache (tokenizers, compiled kernels, latency profiles,
# hub files) goes to one fresh directory per session, whatever the environment says: tests
# never read a stale profile from the user's cache nor write into it. Set before anything is
# imported that reads these variables; servers started as subprocesses inherit them.
CACHE_ROOT = Path(tempfile.mkdtemp(prefix="conserve-test-cache-"))
os.environ["CONSERVE_CACHE_DIR"] = str(CACHE_ROOT / "conserve")
os.environ["XDG_CACHE_HOME"] = str(CACHE_ROOT / "xdg")
os.environ["HF_HOME"] = str(CACHE_ROOT / "hf")
atexit.register(shutil.rmtree, CACHE_ROOT, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _collect_engines():
    """Free each test's engines before the next test: an engine holds its KV cache (gigabytes
    by default) and reference cycles keep it alive until a full collection."""
    yield
    import gc

    gc.collect()


@pytest.fixture(scope="session")
def cache_root() -> Path:
    """The session's temporary cache directory (CONSERVE_CACHE_DIR, XDG_CACHE_HOME and
    HF_HOME all point inside it)."""
    return CACHE_ROOT


# A few paragraphs of plain text, cut to the token lengths the tests need.
TEXT = (
    "The river town woke slowly. Fishermen pulled their boats onto the gravel while the baker "
    "stacked warm loaves in the window, and the schoolteacher walked past with a bundle of "
    "papers under her arm. Nobody in the town could remember when the old bridge had been "
    "built, but everyone agreed that it had outlived three mayors, two floods and one very "
    "determined goat. In spring the meadows along the water filled with yellow flowers, and "
    "children raced paper boats from the mill to the second bend. Engineers who visit the "
    "bridge today are surprised that its arches still carry trucks. The stones were cut by "
    "hand from a quarry on the hill, fitted without mortar, and braced by the weight of the "
    "road itself. A table of measurements kept in the town hall lists the span as forty-two "
    "meters and the height above the summer water as nine. Recipes, too, are kept there: the "
    "baker's rye bread, the innkeeper's onion soup and a cake whose name nobody can spell. "
)


def text_prompt_ids(tokenizer, lengths: list[int]) -> list[list[int]]:
    ids = tokenizer.encode(TEXT * 8, add_special_tokens=False)
    out = []
    for i, n in enumerate(lengths):
        start = (i * 37) % 200
        out.append(ids[start : start + n])
    return out


MIXED_LENGTHS = [10, 23, 64, 100, 181, 256, 417, 600]


@pytest.fixture(scope="session")
def default_source():
    from conserve.model.loader import resolve_model

    return resolve_model("default")


@pytest.fixture(scope="session")
def default_tokenizer(default_source):
    from conserve.model.tokenizer import Tokenizer

    return Tokenizer.load(default_source)


def _save_tiny(folder: Path, config, tokenizer, bias_std: float = 0.0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and bias_std:
                p.normal_(0.0, bias_std)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
    model.save_pretrained(folder)
    tokenizer.hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_tokenizer) -> Path:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=len(default_tokenizer.hf),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.15,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    )
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), cfg, default_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, default_tokenizer) -> Path:
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        vocab_size=len(default_tokenizer.hf),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        initializer_range=0.15,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), cfg, default_tokenizer, bias_std=0.3)


def _reference_run(folder: Path, tokenizer, **kwargs):
    """transformers' float32 greedy run on MIXED_LENGTHS prompts: (prompts, tokens, logits)."""
    from reference import hf_greedy
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs)
    prompts = text_prompt_ids(tokenizer, MIXED_LENGTHS)
    tokens, logits = hf_greedy(model, prompts, 64)
    return prompts, tokens, logits


@pytest.fixture(scope="session")
def smollm2_reference(default_source, default_tokenizer):
    return _reference_run(
        default_source.folder, default_tokenizer, gguf_file=default_source.gguf_file
    )


@pytest.fixture(scope="session")
def tiny_llama_reference(tiny_llama_dir, default_tokenizer):
    return _reference_run(tiny_llama_dir, default_tokenizer)


API_KEY = "test-key-123"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SESSION_PROFILE: list[str] = []


def session_profile() -> str:
    """A latency profile of the default model measured once per session (as `serve` would
    measure it, but kept whatever its error: a busy test machine may not meet the bound, and
    then every server start would measure again). Servers started by `start_server` use it
    unless a test names another. Measured in a child process, so that its engine's KV cache
    and activations do not stay in the test process."""
    if not _SESSION_PROFILE and os.environ.get("CONSERVE_TEST_PROFILE"):
        # a profile measured earlier (e.g. by a previous session), to save the measurement
        # when running a few tests by hand
        _SESSION_PROFILE.append(os.environ["CONSERVE_TEST_PROFILE"])
    if not _SESSION_PROFILE:
        import subprocess
        import sys

        path = CACHE_ROOT / "session-profile.json"
        subprocess.run([sys.executable, "-c", _PROFILE_SCRIPT, str(path)], check=True)
        _SESSION_PROFILE.append(str(path))
    return _SESSION_PROFILE[0]


_PROFILE_SCRIPT = """
import sys
from conserve.config import EngineConfig, SchedulerConfig
from conserve.engine.engine import Engine
from conserve.engine.profiler import NoisyMachineError, build_profile

engine = Engine.from_config(EngineConfig(scheduler=SchedulerConfig(policy="fcfs")))
try:
    model = build_profile(engine, progress=False, retries=0).model
except NoisyMachineError as e:
    model = e.report.model
model.save(__import__("pathlib").Path(sys.argv[1]))
"""


def start_server(*extra: str, env_extra: dict[str, str] | None = None):
    """`conserve serve` on a free loopback port; returns (process, base URL) once healthy.
    `env_extra`: more environment variables for the server process."""
    import subprocess
    import sys
    import tempfile
    import time

    import httpx

    if "--latency-profile" not in extra and "--model" not in extra:
        extra = (*extra, "--latency-profile", session_profile())
    if "--kv-cache-gb" not in extra:
        # the defaults (4 GiB of KV, 2 GiB of host tier) per server, next to the shared server
        # and the test process, ran a 24 GiB machine out of memory
        extra = (*extra, "--kv-cache-gb", "1", "--host-kv-gb", "0.25")
    port = free_port()
    env = dict(os.environ, CONSERVE_API_KEY=API_KEY, **(env_extra or {}))
    if "--data-dir" not in extra:  # never litter the working directory
        env["CONSERVE_DATA_DIR"] = tempfile.mkdtemp(prefix="conserve-data-")
    proc = subprocess.Popen(
        [sys.executable, "-m", "conserve.cli", "serve", "--port", str(port), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def stop_server(proc) -> None:
    import subprocess

    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def server():
    """The real server on the default model, shared by the server test modules."""
    proc, base = start_server("--max-body-mb", "1", "--max-file-mb", "1")
    yield base
    stop_server(proc)


@pytest.fixture
def linear_profile(tmp_path) -> str:
    """A latency profile file of a linear model (2 ms + 0.1 ms per token), for engines whose
    policy needs one without profiling."""
    import numpy as np

    from conserve.engine.latency import FEATURES, LatencyModel

    coef = np.zeros(len(FEATURES))
    coef[FEATURES.index("const")] = 0.002
    coef[FEATURES.index("tokens")] = 0.0001
    path = tmp_path / "profile.json"
    LatencyModel(coef).save(path)
    return str(path)


def native_kernels():
    """The compiled CPU kernels. Skips only where they cannot be built (no C compiler, or
    CONSERVE_KERNELS=0); with a compiler, a kernel that fails to build fails the test."""
    from conserve.kernels import c_compiler, cpu_kernels

    kernels = cpu_kernels()
    if kernels is None:
        if os.environ.get("CONSERVE_KERNELS", "1") == "0" or c_compiler() is None:
            pytest.skip("no C compiler (or CONSERVE_KERNELS=0): the torch paths run instead")
        pytest.fail("a C compiler exists but the CPU kernels did not build: see the log")
    return kernels
