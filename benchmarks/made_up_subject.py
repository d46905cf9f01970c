"""The benchmarks' made-up subject: a red toy with yellow stripes, placed differently on each of five backgrounds
(the photos the speed and fitting benchmarks train on; their figures were measured with these)."""
from PIL import Image, ImageDraw

BACKGROUNDS = [(70, 130, 180), (34, 139, 34), (238, 232, 170), (205, 92, 92), (112, 128, 144)]


def draw_subject(index: int, size: int = 128) -> Image.Image:
    """One photo of the subject, placed differently on each background."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[index % len(BACKGROUNDS)])
    draw = ImageDraw.Draw(image)
    cx, cy = size // 2 + (index - 2) * size // 12, size // 2 + ((index * 7) % 5 - 2) * size // 16
    r = size // 4 + index % 3 * size // 32
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(200, 30, 30))
    for k in (-1, 0, 1):
        y = cy + k * r // 2
        draw.rectangle([cx - r + 4, y - 3, cx + r - 4, y + 3], fill=(250, 215, 0))
    draw.ellipse([cx - r // 3 - 4, cy - r // 2 - 4, cx - r // 3 + 4, cy - r // 2 + 4], fill=(0, 0, 0))
    draw.ellipse([cx + r // 3 - 4, cy - r // 2 - 4, cx + r // 3 + 4, cy - r // 2 + 4], fill=(0, 0, 0))
    return image
