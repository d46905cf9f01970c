"""Training entry for the data-parallel tests: records each rank's timesteps, final trained weights and the
class-image slots it generated.

Run under `python -m paddle.distributed.launch`; writes <output_dir>/rank-<r>-timesteps.json,
<output_dir>/rank-<r>-weights.npz and <output_dir>/rank-<r>-class-slots.json next to the normal outputs.
"""
import json
import os
import sys

import numpy as np
import paddle

from ppdreambooth import train
from ppdreambooth.training import run as run_module
from ppdreambooth.runtime.exiting import exit_process
from ppdreambooth.modeling.objectives import DiffusionObjective, FlowMatchingObjective

drawn = []
class_slots = []


def recording(draw):
    def recording_draw(self, latents):
        noise, timesteps = draw(self, latents)
        drawn.append({"timesteps": timesteps.numpy().tolist(), "noise_sum": float(noise.sum())})
        return noise, timesteps

    return recording_draw


for objective in (DiffusionObjective, FlowMatchingObjective):
    objective.draw = recording(objective.draw)
generate_class_images = run_module.generate_class_images


def recording_generate(model_path, class_dir, class_prompt, slots, **kwargs):
    class_slots.extend(slots)
    return generate_class_images(model_path, class_dir, class_prompt, slots, **kwargs)


run_module.generate_class_images = recording_generate

if __name__ == "__main__":
    args = train.parse_args(sys.argv[1:])
    trainer = train.run(*args)
    rank = paddle.distributed.get_rank()
    out = trainer.args.output_dir
    with open(os.path.join(out, f"rank-{rank}-timesteps.json"), "w") as f:
        json.dump(drawn, f)
    with open(os.path.join(out, f"rank-{rank}-class-slots.json"), "w") as f:
        json.dump(class_slots, f)
    weights = {k: v.numpy() for k, v in trainer.model.trainable_state_dict().items()}
    np.savez(os.path.join(out, f"rank-{rank}-weights.npz"), **weights)
    exit_process(0)  # as the commands end (runtime.exiting)
