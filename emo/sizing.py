"""How much GPU memory a render needs, computed from the model code.

The model is built and run on PyTorch's meta device (shapes only): one guided denoising step of
a clip, and the VAE decode of one chunk of frames. A dispatch mode follows every tensor the
code allocates and frees, and keeps the peak of what is alive at once. Attention is counted as
a fused kernel (flash or memory-efficient SDPA, which CUDA builds of PyTorch use), whose
working memory grows with the tokens, not with their square: on the meta device SDPA would
otherwise be decomposed and its full score matrices counted. Weights are counted in the
render's precision (bf16 on CUDA). Allocator overhead, the CUDA context (about 0.5 GB) and
fragmentation are not counted, so these are lower bounds to size a GPU with some headroom.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

BYTES_BF16 = 2


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one GPU for a render of a configuration."""

    weights: int  # every component's parameters
    step: int  # peak of one guided denoising step of a clip, beyond the weights
    decode: int  # peak of decoding one chunk of frames, beyond the weights

    @property
    def total(self) -> int:
        """The weights and the larger of the two peaks (they never overlap)."""
        return self.weights + max(self.step, self.decode)


class _LiveBytes:
    """Counts the bytes of the tensors alive at once while it is entered (meta device)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale  # the render's element size over the traced one (fp32)
        self.live = 0
        self.peak = 0

    def allocated(self, tensor: Any) -> None:
        size = int(tensor.numel() * tensor.element_size() * self.scale)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._freed, size)

    def _freed(self, size: int) -> None:
        self.live -= size


@contextlib.contextmanager
def _tracking(scale: float) -> Iterator[_LiveBytes]:
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    counter = _LiveBytes(scale)

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            for tensor in tree_flatten(out)[0]:
                new = isinstance(tensor, torch.Tensor) and tensor._base is None
                if new and not any(tensor is a for a in inputs):  # not a view, not in place
                    counter.allocated(tensor)
            return out

    def fused_attention(query, key, value, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        # (B, heads, N, d) -> (B, heads, N, d_v): a fused kernel keeps no (N, N) scores.
        return query.new_empty((*query.shape[:-1], value.shape[-1]))

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fused_attention
    try:
        with Mode():
            yield counter
    finally:
        F.scaled_dot_product_attention = original


def _peak(call: Callable[[], object], scale: float) -> int:
    with _tracking(scale) as counter:
        result = call()
        del result
    return counter.peak


def gpu_memory(
    config: Any, *, element_bytes: int = BYTES_BF16, vae_chunk: int = 4
) -> MemoryEstimate:
    """The memory estimate of rendering ``config`` (an ``EMOConfig``) with weights and
    activations of ``element_bytes`` each, decoding ``vae_chunk`` frames at a time (the
    pipeline's default)."""
    import torch
    from accelerate import init_empty_weights

    from emo.models.components import build_components
    from emo.models.conditioning import Conditioning

    with torch.random.fork_rng(), init_empty_weights(include_buffers=True):
        parts = build_components(config)
    modules = [m for m in vars(parts).values() if isinstance(m, torch.nn.Module)]
    weights = sum(p.numel() for m in modules for p in m.parameters()) * element_bytes
    scale = element_bytes / 4  # traced in float32
    latent, frames, n = config.latent_size, config.clip_frames, config.motion_frames
    channels = config.unet["in_channels"]
    meta = {"device": "meta"}

    def step() -> object:
        reference = parts.reference_net(torch.randn(1, channels, latent, latent, **meta))
        motion = parts.reference_net(torch.randn(max(n, 1), channels, latent, latent, **meta))
        speed = torch.zeros(1, frames, config.audio_tokens, config.speed_dim, **meta)
        width = config.unet["cross_attention_dim"]
        tokens = torch.zeros(2 * frames, config.audio_tokens, width, **meta)  # (2F, K, D)
        conditioning = Conditioning(reference.tokens, motion.maps, n, speed)
        sample = torch.randn(2, channels, frames, latent, latent, **meta)  # guided: batch 2
        return parts.backbone(sample, torch.tensor([500], **meta), tokens, conditioning)

    def decode() -> object:
        return parts.vae.decode(torch.randn(vae_chunk, channels, latent, latent, **meta))

    with torch.no_grad():
        return MemoryEstimate(weights=weights, step=_peak(step, scale), decode=_peak(decode, scale))
