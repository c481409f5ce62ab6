"""Device memory for the paged KV cache."""

from __future__ import annotations

import torch

from conserve import hugepages
from conserve.model.config import ModelConfig


class KVTensors:
    """K and V for every layer: [layers, kv_heads, num_blocks, block_size, head_dim].

    Heads lead so that gathering a request's blocks (`index_select` on the block axis) yields
    [kv_heads, blocks * block_size, head_dim] without a permute: on CPUs the gather and the
    layout decide most of the attention cost. Memory starts zeroed, so padding slots that
    attention masks out can never hold NaN.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (cfg.num_layers, cfg.num_kv_heads, num_blocks, block_size, cfg.head_dim)
        if torch.device(device).type == "cpu":  # huge pages where allowed: blocks are scattered
            self.k, self.v = hugepages.zeros(shape, dtype), hugepages.zeros(shape, dtype)
        else:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_layers * cfg.num_kv_heads * block_size * cfg.head_dim * elem
