"""Activation figures of a live megatron-core GPTModel on a batch: RMS per site, loss, logits.

`ActivationProbe` hooks a model (forward hooks, removed on exit) and pools, over every batch it
runs, the sum of squares and the element count of each site (listed on the class).
RMS = sqrt(mean of squares over all elements of all batches); r = RMS(y) / RMS(x). A linear's y
includes its bias when the module returns it separately. The loss is megatron-core's per-token
cross entropy, averaged over loss-mask tokens (no auxiliary MoE loss: the model runs in eval mode).
Needs the whole model in this process (1 rank: TP = PP = EP = CP = 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from megatron_sparkling.diagnostics.sites import (
    EXPERT_SITES,
    Site,
    bare_model,
    layer_sites,
    linear_sites,
    norm_sites,
    require_whole_model,
    sort_key,
)


class _SumSquares:
    __slots__ = ("sum_sq", "count")

    def __init__(self):
        self.sum_sq = 0.0
        self.count = 0

    def add(self, t: torch.Tensor) -> None:
        t = t.detach()
        self.sum_sq += float(t.double().pow(2).sum())
        self.count += t.numel()

    @property
    def rms(self) -> Optional[float]:
        return math.sqrt(self.sum_sq / self.count) if self.count else None


@dataclass
class SiteFigures:
    site: Site
    rms_in: Optional[float]
    rms_out: Optional[float]
    elements_in: int = 0       # elements the RMS pooled (tokens x features)
    elements_out: int = 0

    @property
    def r(self) -> Optional[float]:
        if self.rms_in is None or self.rms_out is None or self.rms_in == 0:
            return None
        return self.rms_out / self.rms_in

    def to_dict(self) -> dict:
        return {"site": self.site.name, "layer": self.site.layer, "expert": self.site.expert,
                "rms_in": self.rms_in, "rms_out": self.rms_out, "r": self.r}


@dataclass
class ModelFigures:
    """What one model showed on the batches: loss, logits RMS, figures per site."""
    loss: float
    tokens: int
    logits_rms: Optional[float]
    sites: dict = field(default_factory=dict)   # Site -> SiteFigures

    def ordered(self) -> list:
        return [self.sites[s] for s in sorted(self.sites, key=sort_key)]

    def get(self, name: str, layer: Optional[int] = None, expert: Optional[int] = None):
        return self.sites.get(Site(name, layer, expert))

    def residual(self) -> list:
        """(layer, rms at its input, rms at its output) for every layer."""
        return [(f.site.layer, f.rms_in, f.rms_out) for f in self.ordered()
                if f.site.name == "layer"]

    def to_dict(self) -> dict:
        return {"loss": self.loss, "tokens": self.tokens, "logits_rms": self.logits_rms,
                "sites": [f.to_dict() for f in self.ordered()]}


def _first_tensor(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def _linear_output(output):
    """y of a megatron linear: (output, bias) with the bias added when returned apart."""
    if isinstance(output, (tuple, list)):
        y, bias = output[0], output[1] if len(output) > 1 else None
        if isinstance(bias, torch.Tensor) and bias.shape[-1:] == y.shape[-1:]:
            return y + bias
        return y
    return output


def batch_on(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def forward_loss(model, batch: dict):
    """(per-token losses [b, s], loss mask [b, s]) of one micro-batch through the whole model
    (DDP / Float16Module wrappers included, as the training step calls it)."""
    chunk = model[0] if isinstance(model, (list, tuple)) else model
    device = next(bare_model(model).parameters()).device
    batch = batch_on(batch, device)
    losses = chunk(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"], loss_mask=batch["loss_mask"])
    return losses, batch["loss_mask"]


class ActivationProbe:
    """Figures of one model pooled over batches: `run(batch)` does one forward pass with hooks
    on (returning the batch's logits [s, b, V]); `figures()` gives the pooled figures.

    Sites:
    - the residual stream at the input and output of every transformer layer (site "layer");
    - the input and output of every norm (the final norm's input is the residual stream after
      the last layer);
    - the input x and output y of every linear: QKV, attention output, dense fc1/fc2, each
      routed expert's fc1/fc2 (per expert, over the tokens routed to it, AND pooled per layer
      over all the layer's experts: site with expert None), shared-expert fc1/fc2, the router
      (y = the gating logits, recomputed in fp32 from the router's weight) and the output layer
      (y = the logits).
    With Transformer Engine's fused LayerNormLinear the input norm is part of linear_qkv / fc1:
    there is no norm site, and that linear's x is the residual stream before the norm."""

    def __init__(self, model):
        self.model = model
        self.gpt = bare_model(model)
        require_whole_model(self.gpt)
        self._in: dict = {}
        self._out: dict = {}
        self._handles = []
        self._logits = None
        self._loss_sum = 0.0
        self._tokens = 0
        self._logits_sq = _SumSquares()
        self._layers = layer_sites(self.gpt)
        self._norms = norm_sites(self.gpt)
        self._linears = linear_sites(self.gpt)

    # ------------------------------------------------------------------ hooks
    def _acc(self, table, site) -> _SumSquares:
        if site not in table:
            table[site] = _SumSquares()
        return table[site]

    def _observe(self, site: Site, x=None, y=None) -> None:
        for table, t in ((self._in, x), (self._out, y)):
            if t is None:
                continue
            self._acc(table, site).add(t)
            if site.name in EXPERT_SITES and site.expert is not None:
                self._acc(table, site.pooled()).add(t)

    def _install(self) -> None:
        for module, site in self._layers.items():
            self._handles.append(module.register_forward_hook(
                self._layer_hook(site), with_kwargs=True))
        for module, site in self._norms.items():
            self._handles.append(module.register_forward_hook(self._norm_hook(site)))
        for module, site in self._linears.items():
            hook = self._router_hook(site) if site.name == "router" else (
                self._output_hook(site) if site.name == "output_layer" else self._linear_hook(site))
            self._handles.append(module.register_forward_hook(hook))

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _layer_hook(self, site):
        def hook(module, args, kwargs, output):
            x = kwargs.get("hidden_states", args[0] if args else None)
            self._observe(site, x, _first_tensor(output))
        return hook

    def _norm_hook(self, site):
        def hook(module, args, output):
            self._observe(site, args[0], _first_tensor(output))
        return hook

    def _linear_hook(self, site):
        def hook(module, args, output):
            self._observe(site, args[0], _linear_output(output))
        return hook

    def _router_hook(self, site):
        def hook(module, args, output):
            x = args[0]
            with torch.no_grad():
                bias = module.bias.float() if getattr(module, "bias", None) is not None else None
                logits = torch.nn.functional.linear(x.float(), module.weight.float(), bias)
            self._observe(site, x, logits)
        return hook

    def _output_hook(self, site):
        def hook(module, args, output):
            logits = _linear_output(output)
            self._observe(site, args[0], logits)
            # a copy: megatron-core's cross entropy works on the logits in place
            self._logits = logits.detach().clone()
        return hook

    # ------------------------------------------------------------------ runs
    @torch.no_grad()
    def run(self, batch: dict) -> torch.Tensor:
        """One forward pass in eval mode (dropout off); returns the batch's logits [s, b, V]."""
        chunks = self.model if isinstance(self.model, (list, tuple)) else [self.model]
        was_training = [c.training for c in chunks]
        for c in chunks:
            c.eval()
        self._install()  # hooks live only during this pass: two probes may share a model
        try:
            self._logits = None
            losses, mask = forward_loss(self.model, batch)
        finally:
            self._remove()
            for c, t in zip(chunks, was_training):
                c.train(t)
        mask = mask.float()
        self._loss_sum += float((losses.float() * mask).sum())
        self._tokens += int(mask.sum())
        self._logits_sq.add(self._logits)
        return self._logits

    def figures(self) -> ModelFigures:
        sites = {}
        for site in set(self._in) | set(self._out):
            x, y = self._in.get(site), self._out.get(site)
            sites[site] = SiteFigures(site, x.rms if x else None, y.rms if y else None,
                                      x.count if x else 0, y.count if y else 0)
        loss = self._loss_sum / self._tokens if self._tokens else float("nan")
        return ModelFigures(loss, self._tokens, self._logits_sq.rms, sites)


def measure(model, batches: Iterable[dict]) -> ModelFigures:
    """Figures of one model over `batches` (micro-batches as the data loader yields them)."""
    probe = ActivationProbe(model)
    for batch in batches:
        probe.run(batch)
    return probe.figures()
