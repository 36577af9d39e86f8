"""One generate path: evaluation and GRPO rollouts decode a prompt the same way.

    python -m pytest tests/test_generate.py -q
"""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

from lm_eval_dllm import policy as policy_module
from lm_eval_dllm.model import DLLM, sample_seed
from lm_eval_dllm.policy import PolicyConfig, UnmaskPolicy
from train.grpo import Env, GRPOConfig


@pytest.mark.parametrize("mode", ["sample", "greedy"])
def test_evaluation_and_a_rollout_give_the_same_text_and_nfe(tmp_path, tiny_ckpt, mode, monkeypatch):
    loads = []  # the policy is checked at start-up and decoded with: one load serves both
    real_load = policy_module.policy_for
    monkeypatch.setattr(policy_module, "policy_for", lambda *a, **kw: loads.append(kw) or real_load(*a, **kw))
    torch.manual_seed(0)
    policy = UnmaskPolicy(PolicyConfig(block=8, gen_length=48, init="threshold", init_tau=0.6))
    policy.save(tmp_path / "pol", {"alpha": 1.0})
    env = Env(GRPOConfig(pretrained=str(tiny_ckpt), task="modchain", block=8, device="cpu", dtype="float32"),
              torch.device("cpu"))
    prompts = env.scorer.prompts("validation", n=6, seed=0)

    lm = DLLM(pretrained=str(tiny_ckpt), sampler="learned", policy=str(tmp_path / "pol"), mode=mode,
              policy_temperature=1.0, block=8, batch_size=4, device="cpu", dtype="float32")  # as rollouts sample
    reqs = [Instance(request_type="generate_until", doc=p.doc, arguments=(p.context, p.gen_kwargs), idx=0,
                     metadata=("modchain", p.doc_id, 1)) for p in prompts]
    texts = lm.generate_until(reqs, disable_tqdm=True)
    stats = [lm.stats["modchain"][i] for i in range(len(prompts))]
    assert [(kw["block"], kw["gen_length"]) for kw in loads] == [(8, 48)]

    seeds = [sample_seed(lm.cfg.seed, p.context) for p in prompts]  # evaluation's per-sample seed
    ro = env.rollout(UnmaskPolicy.load(tmp_path / "pol"), prompts, seeds, mode=mode, record=False)
    nfes, rollout_texts = ro.nfes, ro.texts
    assert rollout_texts == texts
    assert nfes.long().tolist() == [s["nfe"] for s in stats]
    assert env.L == stats[0]["gen_length"] and env.block == stats[0]["block"] == 8
