"""lm-eval-dllm: masked diffusion LMs in lm-evaluation-harness, with learned unmasking policies."""

__version__ = "0.1.0"
