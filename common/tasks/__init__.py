"""What each `main.py --task` does, from a validated config to files in a run folder.

The top layer of the core: it may import every other subpackage. Everything that can
fail because of the user's input (config, dataset, checkpoint, model options) is checked
before a run folder is created, so a bad command writes nothing.

- `training`: `train`;
- `evaluation`: `eval`, a checkpoint's accuracy on val and test;
- `costs`: `time`, params, MACs, throughput, latency and memory of one or several configs;
- `attention_figures`: `viz` and `viz_1`, through the capture contract;
- `model_figures`: tasks that model packages register (`common.registry.register_figure_task`),
  drawn through the figure hook a model declares (`common.models.hooks`);
- `run_folder`: run folders, resume checks, seeding and loading weights, shared by the above;
- `study`: `study`, every (config, seed) of a study file into one folder, through `launchers`
  (`local`: one run after another here; `slurm`: a SLURM job per run through submitit).
"""

from common.tasks.attention_figures import visualize
from common.tasks.costs import time_models
from common.tasks.evaluation import evaluate_checkpoint
from common.tasks.model_figures import draw_model_figure
from common.tasks.training import train

__all__ = ["draw_model_figure", "evaluate_checkpoint", "time_models", "train", "visualize"]
