"""benchmarks.peers end to end on a tiny model (`--tiny`): the table has every row, and ours with
compat=fast-dllm gives Fast-dLLM's tokens and NFE. Needs Fast-dLLM's code (../shared/reference/fast-dllm):
skipped without it, as tests/test_fast_dllm.py is."""

from __future__ import annotations

import re

import pytest

from benchmarks import peers

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (peers.FAST_DLLM / "generate.py").exists(),
                                 reason="no Fast-dLLM code at ../shared/reference/fast-dllm (only the developers' "
                                        "checkout has it)")]


def test_tiny_run_has_every_row_and_fast_dllm_tokens():
    text = peers.main(["--tiny", "--no-write", "--prompts", "2", "--batch", "3"])
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
             if line.startswith(("| ours", "| Fast-dLLM"))]
    assert [(c[0], c[1]) for c in cells] == [(r.name, "3" if r.batched else "1") for r in peers.ROWS]
    for row, c in zip(peers.ROWS, cells):
        assert c[2] == ("3" if row.batched else "2")  # prompts decoded
        if row.impl == "ours" and not row.window:
            assert c[-1] == "yes: tokens 2/2, NFE 2/2", (row.name, c[-1])
    for cache in peers.FUNCTIONS:
        assert re.search(rf"Batch 1, cache={cache}: ours / Fast-dLLM's \w+ = \*\*\d+\.\d\dx\*\* tokens/s", text)
    assert re.search(r"Our best row with Fast-dLLM's tokens, ours cache=\w+ at batch [13] .*\*\*\d+\.\d\dx\*\*", text)


def test_bad_counts_are_refused(capsys):
    with pytest.raises(SystemExit):
        peers.main(["--tiny", "--batch", "0"])
    assert "--batch=0; valid: 1, 2, ..." in capsys.readouterr().err
