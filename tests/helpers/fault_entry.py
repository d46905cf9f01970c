"""Training entry that injects a fault, for the robustness tests.

    FAULT=<point>:<n> python tests/helpers/fault_entry.py <train flags>

Points (each fires on its n-th occurrence):
  kill_in_step        SIGKILL inside the model's forward pass (mid-step)
  kill_in_checkpoint  SIGKILL after a checkpoint's weights are written, before its optimizer state
  kill_in_final_save  SIGKILL after the first pipeline component is moved into place
  kill_in_class_image SIGKILL right after a class image is written
  nan_in_step         the loss becomes NaN
"""
import os
import signal
import sys

import paddle

from ppdreambooth.data import class_images
from ppdreambooth.interop import pipeline_folder
from ppdreambooth import train
from ppdreambooth.modeling.model import DreamBoothModel

point, _, nth = os.environ["FAULT"].partition(":")
nth = int(nth or 1)
seen = {"count": 0}


def hit() -> bool:
    seen["count"] += 1
    return seen["count"] == nth


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if point in ("kill_in_step", "nan_in_step"):
    original_forward = DreamBoothModel.forward

    def forward(self, *args, **kwargs):
        out = original_forward(self, *args, **kwargs)
        if hit():
            if point == "kill_in_step":
                die()
            out["loss"] = out["loss"] * float("nan")
        return out

    DreamBoothModel.forward = forward
elif point == "kill_in_checkpoint":
    # state dicts are written by ppdreambooth.runtime.streamed_save (anything else by paddle.save): hook both
    from ppdreambooth.runtime import streamed_save as streamed

    def dying_before_optimizer_state(original):
        def save(obj, path, *args, **kwargs):
            if str(path).endswith("optimizer.pdopt") and hit():
                die()
            return original(obj, path, *args, **kwargs)
        return save

    paddle.save = dying_before_optimizer_state(paddle.save)
    streamed.streamed_save = dying_before_optimizer_state(streamed.streamed_save)
elif point == "kill_in_final_save":
    original_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        result = original_replace(src, dst, *args, **kwargs)
        if ".pipeline-staging" in str(src) and not str(src).endswith(".old") and hit():
            die()
        return result

    pipeline_folder.os.replace = replace
elif point == "kill_in_class_image":
    original_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        result = original_replace(src, dst, *args, **kwargs)
        if os.path.basename(str(dst)).startswith("class-") and hit():
            die()
        return result

    class_images.os.replace = replace
else:
    raise SystemExit(f"unknown FAULT point {point!r}")

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
