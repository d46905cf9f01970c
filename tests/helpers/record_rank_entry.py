"""Training entry for the data-parallel test: records each rank's timesteps and final trained weights.

Run under `python -m paddle.distributed.launch`; writes <output_dir>/rank-<r>-timesteps.json and
<output_dir>/rank-<r>-weights.npz next to the normal outputs.
"""
import json
import os
import sys

import numpy as np
import paddle

from ppdreambooth import train
from ppdreambooth.runtime.exiting import exit_process
from ppdreambooth.modeling.objectives import DiffusionObjective, FlowMatchingObjective

drawn = []


def recording(draw):
    def recording_draw(self, latents):
        noise, timesteps = draw(self, latents)
        drawn.append({"timesteps": timesteps.numpy().tolist(), "noise_sum": float(noise.sum())})
        return noise, timesteps

    return recording_draw


for objective in (DiffusionObjective, FlowMatchingObjective):
    objective.draw = recording(objective.draw)

if __name__ == "__main__":
    args = train.parse_args(sys.argv[1:])
    trainer = train.run(*args)
    rank = paddle.distributed.get_rank()
    out = trainer.args.output_dir
    with open(os.path.join(out, f"rank-{rank}-timesteps.json"), "w") as f:
        json.dump(drawn, f)
    weights = {k: v.numpy() for k, v in trainer.model.trainable_state_dict().items()}
    np.savez(os.path.join(out, f"rank-{rank}-weights.npz"), **weights)
    exit_process(0)  # as the commands end (runtime.exiting)
