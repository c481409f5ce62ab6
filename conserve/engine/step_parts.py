"""Where a model step's time goes: seconds per named part, for the roofline benchmark.

Set a `StepParts` on a runner (`runner.parts = StepParts()`, `parts.attach(model)`) and every
step it runs adds to it: `prepare` (tensors for the step and the embedding), `layers` (the
decoder layers), `attention` (inside the layers: K/V write and attention), `linear` (inside
the layers: the projections, through forward hooks on the model's `Linear` modules), `logits`
(final norm and vocabulary projection of the rows that sample), `lm_head` (inside `logits`)
and `sampling`. Torch runs CPU ops synchronously, so wall time around a call is that call's
cost. With no `StepParts` set the runner pays one attribute check per part.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from conserve.model.llama import Linear


class StepParts:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._hooks: list = []
        self._started: dict[int, float] = {}

    def reset(self) -> None:
        self.seconds.clear()

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def attach(self, model: nn.Module) -> None:
        """Time every `Linear` of `model`: the vocabulary projection (`lm_head`) as `lm_head`,
        the others as `linear`."""
        head = getattr(model, "lm_head", None)
        for mod in model.modules():
            if isinstance(mod, Linear):
                name = "lm_head" if mod is head else "linear"
                self._hooks.append(mod.register_forward_pre_hook(self._pre))
                self._hooks.append(mod.register_forward_hook(self._post(name)))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _pre(self, mod: nn.Module, args: tuple) -> None:
        self._started[id(mod)] = time.perf_counter()

    def _post(self, name: str):
        def hook(mod: nn.Module, args: tuple, out) -> None:
            self.seconds[name] += time.perf_counter() - self._started.pop(id(mod))

        return hook
