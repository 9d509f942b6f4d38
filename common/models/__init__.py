"""Model building blocks of the core, and what a model may offer the core.

- `resnet`: the ResNet backbone (basic, bottleneck, pre-activation) with its spatial mixer and stem
  chosen by name, and the conv baselines (`resnet18/26/38/50`, `wrn28_10`);
- `hooks`: what any module may define for the core to call (extra loss, after-step, per-epoch
  metrics and images, end-of-training figures, figure tasks), collected by `ModelHooks`;
- `weight_decay`: the mark a layer puts on parameters that must not be decayed.

May import: torch, the foundation, `ops` and `inspect.capture`. Never `data`, `train` or `tasks`.
"""
