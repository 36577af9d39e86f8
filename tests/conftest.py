import os
from pathlib import Path

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

    # a 512-token context (the real one is 4,096): 5-shot prompts are truncated, so that the
    # 126k-vocabulary output layer over the whole canvas stays fast
    return build_tiny_checkpoint(tmp_path_factory.mktemp("llada"), "llada", d_model=16,
                                 max_sequence_length=512)


@pytest.fixture(scope="session")
def dream_ckpt(tmp_path_factory):
    from lm_eval_dllm.testing import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("dream"), "dream", d_model=16,
                                 max_position_embeddings=512)


@pytest.fixture(scope="session", autouse=True)
def one_task_index_per_folder_list():
    """Every TaskManager() indexes lm-eval's task folders (thousands of YAML files, seconds) and the
    in-process runs (train.grpo, results, TaskScorer) each build one. Those folders and ours do not
    change while the tests run: each list of them is indexed once in this process. A list with any
    other folder (a test's own tasks) is indexed every time; subprocesses index as users' runs do."""
    import lm_eval
    from lm_eval.tasks._index import TaskIndex

    from lm_eval_dllm.tasks import task_dir

    fixed = {Path(lm_eval.__file__).parent / "tasks", task_dir()}
    build, built = TaskIndex.build, {}

    def build_once(paths, *, resolve_includes=True):
        paths = list(paths)
        if not {Path(p) for p in paths} <= fixed:
            return build(paths, resolve_includes=resolve_includes)
        key = (tuple(str(p) for p in paths), resolve_includes)
        if key not in built:
            built[key] = build(paths, resolve_includes=resolve_includes)
        return dict(built[key])  # entries are read only: the factory deep-copies their configs

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TaskIndex, "build", staticmethod(build_once))
        yield


@pytest.fixture(scope="session")
def task_manager():
    """One lm-eval TaskManager (indexing every task takes seconds) with our shipped tasks."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


@pytest.fixture(scope="session")
def tiny_loaded(tiny_ckpt):
    from lm_eval_dllm.loading import load

    return load(str(tiny_ckpt), dtype="float32", device="cpu")


SHARED_GSM8K = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


@pytest.fixture(scope="session")
def gsm8k_offline(tmp_path_factory):
    """HF_DATASETS_CACHE with GSM8K from ../shared/data, so the stock `gsm8k` task loads offline."""
    if not (SHARED_GSM8K / "test.jsonl").exists():
        pytest.skip(f"no GSM8K data at {SHARED_GSM8K} (only the developers' checkout has ../shared)")
    import datasets

    from lm_eval_dllm.testing import install_offline_gsm8k

    cache = tmp_path_factory.mktemp("hf_datasets")
    install_offline_gsm8k(SHARED_GSM8K, cache)
    old_env, old_cfg = os.environ.get("HF_DATASETS_CACHE"), datasets.config.HF_DATASETS_CACHE
    os.environ["HF_DATASETS_CACHE"] = str(cache)
    datasets.config.HF_DATASETS_CACHE = cache
    yield cache
    datasets.config.HF_DATASETS_CACHE = old_cfg
    if old_env is None:
        os.environ.pop("HF_DATASETS_CACHE", None)
    else:
        os.environ["HF_DATASETS_CACHE"] = old_env
