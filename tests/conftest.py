import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from lm_eval_dllm.testing import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny")


@pytest.fixture(scope="session")
def llada_ckpt(tmp_path_factory):
    from lm_eval_dllm.testing import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("llada"), "llada", d_model=16)


@pytest.fixture(scope="session")
def dream_ckpt(tmp_path_factory):
    from lm_eval_dllm.testing import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("dream"), "dream", d_model=16)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_ckpt):
    from lm_eval_dllm.loading import load

    return load(str(tiny_ckpt), dtype="float32", device="cpu")
