"""Where each row's blocks lie in the generated region of the decode loop.

    python -m pytest -q tests/test_moe_families.py -k blocks

Masked diffusion families (LLaDA, Dream, ...) count blocks from the first generated position:
block b is generated positions [b B, (b + 1) B) of every row. Block-diffusion families (LLaDA2)
align blocks to absolute positions, as their attention does: a row whose prompt has p tokens
starts generating at offset p mod B inside its block, so its first block is partly prompt, and
it decodes on to the end of the block that holds its last position (up to B - 1 positions past
gen_length, which are decoded as the official code does and then dropped). With left padding
the offsets differ per row, so the block is a per-row mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockLayout:
    size: int  # B
    offsets: torch.Tensor  # (rows,) where generated position 0 sits in its block
    lengths: torch.Tensor  # (rows,) generated positions each row decodes
    width: int  # the longest of them: the generated region's columns
    count: int  # blocks the loop runs

    def in_block(self, b: int) -> torch.Tensor:
        """(rows, width) bool: the generated positions of each row's block b."""
        pos = torch.arange(self.width, device=self.offsets.device)[None, :]  # (1, W)
        return ((self.offsets[:, None] + pos) // self.size == b) & (pos < self.lengths[:, None])

    def span(self, b: int) -> tuple[int, int]:
        """Generated positions [lo, hi) that hold some row's block b."""
        lo = b * self.size - int(self.offsets.max())
        hi = (b + 1) * self.size - int(self.offsets.min())
        return max(lo, 0), min(hi, self.width)


def block_layout(prompt_lengths: list[int], gen_length: int, block: int, aligned: bool,
                 device: torch.device | str = "cpu") -> BlockLayout:
    """Blocks of `block` positions over `gen_length` generated positions (block divides it);
    aligned: to absolute positions (block diffusion), else to the first generated position."""
    p = torch.tensor(prompt_lengths, dtype=torch.long, device=device)
    offsets = p % block if aligned else torch.zeros_like(p)
    lengths = gen_length + (block - offsets) % block  # to the end of the last block
    count = int((offsets + lengths).max()) // block
    return BlockLayout(block, offsets, lengths, int(lengths.max()), count)
