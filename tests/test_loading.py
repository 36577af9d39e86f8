"""Loading through transformers: families, specs and one-line errors."""

import pytest
import torch

from lm_eval_dllm.loading import load, resolve_device, resolve_dtype
from lm_eval_dllm.testing import float_tol
from lm_eval_dllm.utils import DLLMError


def test_llada_interface(llada_ckpt):
    model, tok, sp = load(str(llada_ckpt), dtype="float32", device="cpu")
    assert type(model).__name__ == "NativeDLLM"  # no remote code: the package's own LLaDA
    assert (sp.family, sp.mask_id, sp.shifted) == ("llada", 126336, False)
    assert 126081 in sp.stop_ids and 126348 in sp.stop_ids  # EOS and <|eot_id|>
    assert sp.suppress_ids == (126336,)


def test_dream_interface(dream_ckpt):
    model, tok, sp = load(str(dream_ckpt), dtype="float32", device="cpu")
    assert (sp.family, sp.mask_id, sp.shifted) == ("dream", 151666, True)
    assert 151643 in sp.stop_ids and 151645 in sp.stop_ids  # EOS and <|im_end|>


def test_dtype_applies(tiny_ckpt):
    model, _, _ = load(str(tiny_ckpt), dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_missing_path():
    with pytest.raises(DLLMError, match="pretrained path '/nonexistent/ckpt' does not exist"):
        load("/nonexistent/ckpt")


def test_not_a_dllm(tmp_path):
    from lm_eval_dllm.testing import build_tiny_checkpoint

    ck = build_tiny_checkpoint(tmp_path / "nomask", "tiny", mask=False)
    with pytest.raises(DLLMError, match="has no mask token.*not a masked diffusion LM; valid"):
        load(str(ck))


def test_dir_without_config(tmp_path):
    with pytest.raises(DLLMError, match="has no config.json"):
        load(str(tmp_path))


@pytest.mark.parametrize("bad", ["float8", "int4"])
def test_bad_dtype(bad):
    with pytest.raises(DLLMError, match=f"unsupported dtype '{bad}'; valid: auto, float32"):
        resolve_dtype(bad)


def test_bad_device():
    with pytest.raises(DLLMError, match="unsupported device 'toaster'; valid: auto, cpu"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(DLLMError, match="CUDA is not available here; valid: cpu"):
            resolve_device("cuda")


@pytest.mark.parametrize("pos", ["rope", "both"])
def test_rotary_tiny_model_survives_save_and_load(tmp_path, pos):
    """Regression: the rotary frequencies were a non-persistent buffer that from_pretrained left
    uninitialised, so a reloaded rope model computed garbage."""
    import torch

    from lm_eval_dllm.tiny import TinyDLLMConfig, TinyDLLMModel

    torch.manual_seed(0)
    m = TinyDLLMModel(TinyDLLMConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                     max_position=32, mask_token_id=15, pos_encoding=pos)).eval()
    m.save_pretrained(tmp_path / "m")
    back = TinyDLLMModel.from_pretrained(tmp_path / "m").eval()
    x = torch.randint(0, 15, (2, 10))
    with torch.no_grad():
        assert torch.equal(m(x).logits, back(x).logits)  # the same weights, the same kernels


def test_written_out_attention_is_the_fused_one():
    # the tiny model writes attention out under bf16 on CPU (the fused kernel is slow there)
    import torch.nn.functional as F

    from lm_eval_dllm.tiny.modeling import explicit_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 9, 8, generator=g) for _ in range(3))
    key_mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    key_mask[1, ..., :4] = False  # a left-padded row
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    # softmax over 9 keys, then a weighted sum of values: reductions of at most 9 + 8 terms
    torch.testing.assert_close(explicit_attention(q, k, v, key_mask), want, rtol=0,
                               atol=float_tol(v.abs().max(), 9 + 8))
