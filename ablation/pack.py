"""K networks of one architecture as one batched computation: the parameters and buffers of the K
copies stacked along a leading trial dimension, and one forward pass over all of them with
``torch.func.vmap`` (each convolution becomes one grouped convolution, each BatchNorm one call
over K x C channels, per channel and so per copy). The packed trainer (:mod:`ablation.packed`)
trains K trials of a sweep this way; this module knows nothing of trials.

A packed network takes the K copies' inputs concatenated along the batch dimension, (K*B, ...),
and returns their outputs the same way, so code written for one network (the attacks, the
methods' losses) runs on K unchanged: element-wise arithmetic and per-sample norms act per copy
and sample. Losses that average over a batch average per copy (``pack_size``, read by
:func:`ablation.attacks.mean_ce`): the sum of the K means, whose gradient for each copy is that
of its own mean, as it would be alone.

BatchNorm's running statistics are stacked buffers updated in place by each copy's forward in
train mode, as a lone network's are (``torch.func``'s documented replacement of BatchNorm drops
them, which evaluation cannot do without).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap


class PackedNet:
    """K copies of ``template``'s architecture with stacked weights, called like one network.

    ``params`` and ``buffers`` map the template's names to tensors of shape (K, *shape): the
    parameters are leaves that require gradients, the buffers (BatchNorm statistics, the fixed
    normalisation) are updated in place. ``train()``/``eval()`` switch the mode of all K.
    """

    def __init__(self, template: nn.Module, params: dict[str, Tensor],
                 buffers: dict[str, Tensor]):
        """``template``: the architecture on the meta device (:meth:`template_of`), whose
        train/eval mode is the pack's."""
        self.template = template
        self.params, self.buffers = params, buffers
        self.size = len(next(iter(params.values())))
        self._forward = vmap(self._one, in_dims=(0, 0, 0))

    @staticmethod
    def template_of(model: nn.Module | "PackedNet") -> nn.Module:
        """A storage-free copy of the architecture (a mode of its own)."""
        source = model.template if isinstance(model, PackedNet) else model
        return copy.deepcopy(source).to("meta")

    @classmethod
    def stack(cls, models: Sequence[nn.Module]) -> "PackedNet":
        """A pack of copies of ``models`` (one architecture; their current values)."""
        named = [dict(m.named_parameters()) for m in models]
        stored = [dict(m.named_buffers()) for m in models]
        params = {n: torch.stack([p[n].detach() for p in named]).requires_grad_(True)
                  for n in named[0]}
        buffers = {n: torch.stack([b[n].detach() for b in stored]) for n in stored[0]}
        return cls(cls.template_of(models[0]).train(models[0].training), params, buffers)

    def _one(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.template, (params, buffers), (x,))

    def __call__(self, x: Tensor) -> Tensor:
        return self._forward(self.params, self.buffers,
                             x.unflatten(0, (self.size, -1))).flatten(0, 1)

    @property
    def pack_size(self) -> int:
        return self.size

    @property
    def training(self) -> bool:
        return self.template.training

    def train(self, mode: bool = True) -> "PackedNet":
        self.template.train(mode)
        return self

    def eval(self) -> "PackedNet":
        return self.train(False)

    def parameters(self) -> Iterator[Tensor]:
        return iter(self.params.values())

    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self.params.items())

    def state_dict(self, k: int) -> dict[str, Tensor]:
        """Copy ``k``'s state dict, in the template's order and names (persistent buffers)."""
        out = {}
        persistent = self.template.state_dict(keep_vars=True)
        for name in persistent:
            source = self.params.get(name, self.buffers.get(name))
            out[name] = source[k].detach().clone()
        return out

    def load_state_dict(self, k: int, state: dict[str, Tensor]) -> None:
        """Set copy ``k`` to a lone network's state dict."""
        with torch.no_grad():
            for name, value in state.items():
                target = self.params[name] if name in self.params else self.buffers[name]
                target[k].copy_(value)
