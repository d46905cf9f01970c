"""Subject photos made in the test run (random pixels, non-square so training crops are really random)."""
import os

import numpy as np
from PIL import Image


def write_photos(folder, count=4, size=(96, 80), seed=0):
    """Non-square random photos: a 64 px training crop from them is really random."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(count):
        Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3)).astype(np.uint8)).save(
            os.path.join(folder, f"photo-{i}.png")
        )
    return str(folder)


def two_concepts(tmp_path):
    """Two subjects with non-square photos (a caption on one) and class folders of 2 images each:
    (the `concepts` list, the first subject's photo folder)."""
    dog = write_photos(tmp_path / "dog", count=3, size=(96, 64))
    cat = write_photos(tmp_path / "cat", count=2, size=(64, 96), seed=1)
    with open(os.path.join(dog, "photo-0.txt"), "w") as f:
        f.write("{instance_prompt} on a sofa")
    concepts = [
        {"instance_data_dir": dog, "instance_prompt": "a photo of sks dog", "class_data_dir": str(tmp_path / "cls"),
         "class_prompt": "a photo of dog", "num_class_images": 2},
        {"instance_data_dir": cat, "instance_prompt": "a photo of zwx cat", "class_data_dir": str(tmp_path / "cls2"),
         "class_prompt": "a photo of cat", "num_class_images": 2},
    ]
    return concepts, dog
