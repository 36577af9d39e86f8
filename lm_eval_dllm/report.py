"""Put the `dllm` model's measurements into lm-eval's results dict (called by the hook).

The model hands them over in its `get_model_info()`, which lm-eval merges into results["config"]:
per task under "dllm", and per document under SAMPLES_KEY, which attach_stats moves into the
logged samples (it never reaches the results JSON)."""

from __future__ import annotations

SAMPLES_KEY = "dllm_samples"  # get_model_info's entry: task -> doc_id -> that document's statistics

# results[task] keys, as lm-eval names metrics ("metric,filter"), so `make_table` prints them
STAT_KEYS = {"nfe": "mean_nfe", "tpf": "tpf", "positions_per_forward": "positions_per_forward",
             "wall_s": "wall_s_per_sample", "ll_forwards": "mean_ll_forwards"}


def attach_stats(results: dict) -> None:
    config = results.get("config") or {}
    per_doc = config.pop(SAMPLES_KEY, None) or {}
    info = config.get("dllm")
    if not info:
        return
    for task, s in info.get("per_task", {}).items():
        row = results.get("results", {}).get(task)
        if row is None:
            continue
        for key, src in STAT_KEYS.items():
            if src not in s:  # generation tasks have no ll_forwards, loglikelihood ones no nfe
                continue
            row[f"{key},none"] = s[src]
            row[f"{key}_stderr,none"] = "N/A"
    for task, samples in (results.get("samples") or {}).items():
        for sample in samples:
            st = per_doc.get(task, {}).get(sample.get("doc_id"))
            if st:
                sample["dllm"] = st[-1] if len(st) == 1 else st
