"""Aspect-ratio buckets (`--enable_bucket`): training sizes that keep each photo's shape.

Buckets are (height, width) pairs, both multiples of `--bucket_reso_steps` within
[`--min_bucket_reso`, `--max_bucket_reso`], with at most `--resolution`² pixels and as close to it as
the step allows. Each image goes to the bucket whose aspect ratio is nearest its own (in log scale),
is resized to cover it and centre-cropped: only the small aspect-ratio difference is cut, never the
subject. The batch sampler keeps every batch within one bucket.
"""
from __future__ import annotations

import math
from typing import List

from ppdreambooth.batch import Size



def make_buckets(resolution: int, min_reso: int, max_reso: int, step: int) -> List[Size]:
    max_area = resolution * resolution
    buckets = set()
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, (max_area // width) // step * step)
        if height >= min_reso:
            buckets.add((height, width))
            buckets.add((width, height))
    return sorted(buckets)


def nearest_bucket(height: int, width: int, buckets: List[Size]) -> Size:
    """The bucket nearest the image's aspect ratio; among equals, the one with more pixels."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - ratio), -b[0] * b[1]))
