"""What `evaluate` shows: the table beside the paper's numbers and the contact sheet of photos and images."""
from __future__ import annotations

from typing import Dict, List, Sequence

# The paper's Table 1 (DreamBench: 30 subjects x 25 prompts x 4 images).
PAPER = {
    "dreambooth_stable_diffusion": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
    "dreambooth_imagen": {"dino": 0.696, "clip_i": 0.812, "clip_t": 0.306},
    "real_images": {"dino": 0.774, "clip_i": 0.885},
}
METRICS = (("dino", "DINO", "subject fidelity: generated x your photos"),
           ("clip_i", "CLIP-I", "subject fidelity: generated x your photos"),
           ("clip_t", "CLIP-T", "prompt fidelity: generated x its prompt"))


def contact_sheet(photos: Sequence, runs: Dict[str, List[list]], prompts: Sequence[str], cell_height: int = 256):
    """The real photos on top, then per prompt a labelled row: the model's images, then the base model's.
    Cells have the generated images' aspect ratio; photos are centre-cropped to it."""
    from PIL import Image, ImageDraw, ImageOps

    band, gap = 14, 8  # a text line above each row; space between the trained and base blocks
    first = runs["trained"][0][0]
    cell = (max(1, round(cell_height * first.size[0] / first.size[1])), cell_height)  # (width, height)
    per_run = len(runs["trained"][0])
    names = [name for name in ("trained", "base") if name in runs]
    block = per_run * cell[0] + gap
    columns = max(per_run * len(names), 1)
    width = max(len(names) * block - gap, 200)
    photo_rows = -(-len(photos) // columns)
    height = band + photo_rows * cell[1] + band + len(prompts) * (band + cell[1])
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    characters = max(width // 6, 10)  # PIL's default font is about 6 px wide

    draw.text((2, 1), f"your photos ({len(photos)})"[:characters], fill="black")
    for i, photo in enumerate(photos):
        row, col = divmod(i, columns)
        sheet.paste(ImageOps.fit(photo.convert("RGB"), cell), (col * cell[0], band + row * cell[1]))
    y = band + photo_rows * cell[1]
    for r, name in enumerate(names):
        draw.text((r * block + 2, y + 1), name, fill="blue")
    y += band
    for p, prompt in enumerate(prompts):
        draw.text((2, y + 1), prompt[:characters], fill="black")
        for r, name in enumerate(names):
            for i, image in enumerate(runs[name][p]):
                sheet.paste(image.convert("RGB").resize(cell), (r * block + i * cell[0], y + band))
        y += band + cell[1]
    return sheet


def format_table(results: dict) -> str:
    metrics, photos = results["metrics"], results["metrics"].get("your_photos", {})
    settings = results["settings"]
    has_base = "base" in metrics
    paper = PAPER["dreambooth_stable_diffusion"]
    head = f"{'':8}{'':45}{'trained':>9}" + (f"{'base':>9}{'change':>9}" if has_base else "") + f"{'paper':>8}"
    lines = [f"Fidelity over {len(settings['prompts'])} prompts x {settings['num_images']} images, "
             f"{settings['num_photos']} photos of the subject", head]
    for key, name, what in METRICS:
        line = f"{name:8}{what:45}{metrics['trained'][key]:9.3f}"
        if has_base:
            line += f"{metrics['base'][key]:9.3f}{metrics['trained'][key] - metrics['base'][key]:+9.3f}"
        lines.append(line + f"{paper[key]:8.3f}")
    if photos.get("dino") is not None:
        real = PAPER["real_images"]
        lines.append(f"Your photos among themselves (the ceiling): DINO {photos['dino']:.3f}, CLIP-I "
                     f"{photos['clip_i']:.3f} (the paper's real images: {real['dino']:.3f}, {real['clip_i']:.3f})")
    if not has_base:
        lines.append("No base model compared (--no_base, or a full fine-tune without a model card: --base_model).")
    lines.append("paper: DreamBooth on Stable Diffusion, DreamBench (Ruiz et al. 2023, Table 1)")
    return "\n".join(lines)
