"""The shared core: everything the paper packages have in common, and nothing that names one of them.

Layers, lowest first; a module imports only from its own layer and the ones below:

    errors, config, registry,  the foundation: user errors, typed configs, name -> constructor registries,
    files                      safe writes (atomic files, output-folder checks, the run lock)
    ops/                       attention kernels (neighbourhood attention: reference, tiled, Triton)
    models/                    model building blocks: the ResNet backbone and conv baselines, the hooks a
                               model offers the core, the no-weight-decay mark
    data/                      datasets, loaders, batched augmentation, mixing
    inspect/                   looking at models: the attention-capture contract, figures, costs, reports
    train/                     the training engine: optimisers, checkpoints, distributed, EMA, logging
    tasks/                     what each `main.py --task` does

The two contracts are the exceptions: the capture contract (`inspect.capture`) and the FLOP-count contract
(`inspect.flops`) need only torch and every layer may import them, so attention kernels can record their maps
and count the FLOPs of their math. Paper packages reach the core through the
registries (models, mixers, stems, figure tasks) and the model hooks; `registry.MODEL_PACKAGES` is the
one place here that names them (tests/common/test_layering.py checks both rules).
"""
