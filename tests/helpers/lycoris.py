"""LyCORIS test helpers: NumPy transcriptions of the published formulas, ComfyUI's reading of a LyCORIS/kohya file,
and the small model-level pieces the LoHa/LoKr/LoCon tests share."""
import numpy as np
import paddle


# ----- NumPy transcriptions of the formulas (PyTorch layout: W [out, in]) --------------------------------------------
def numpy_loha(p, alpha):
    rank = p["hada_w1_b"].shape[0]
    return (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * alpha / rank


def numpy_lokr(p, alpha):
    if "lokr_w2" in p:
        return np.kron(p["lokr_w1"], p["lokr_w2"])
    rank = p["lokr_w2_b"].shape[0]
    return np.kron(p["lokr_w1"], p["lokr_w2_a"] @ p["lokr_w2_b"]) * alpha / rank


def comfyui_merge(kohya_file, name, weight_t, strength=1.0):
    """ComfyUI's reading of one module of a LyCORIS file (comfy/weight_adapter loha.py / lokr.py): LoHa scale
    alpha / hada_w1_b.shape[0]; LoKr alpha / (w2_b or w1_b).shape[0] when a factor is low rank, else 1; ΔW reshaped
    to the weight's shape and added times the strength."""
    f = {k[len(name) + 1:]: v.astype(np.float64) for k, v in kohya_file.items() if k.startswith(name + ".")}
    alpha = float(f["alpha"]) if "alpha" in f else None
    if "lora_down.weight" in f:  # LoRA / LoCon (comfy/weight_adapter/lora.py): up.flatten(1) @ down.flatten(1)
        down, up = f["lora_down.weight"], f["lora_up.weight"]
        dim = down.shape[0]
        diff = up.reshape(up.shape[0], -1) @ down.reshape(dim, -1)
    elif "hada_w1_a" in f:
        dim = f["hada_w1_b"].shape[0]
        diff = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
    else:
        dim = None
        w1 = f["lokr_w1"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        else:
            dim = f["lokr_w2_b"].shape[0]
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        if w2.ndim == 4:  # a convolution's full w2: w1 unsqueezed to [a, c, 1, 1]
            w1 = w1[:, :, None, None]
        diff = np.kron(w1, w2)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return weight_t + strength * scale * diff.reshape(weight_t.shape)


def torch_layout(weight):
    """A Paddle weight in PyTorch's layout: Linear [in, out] transposed; a Conv2D kernel is the same already."""
    return weight.T if weight.ndim == 2 else weight


def dataset_of(model, photos):
    from ppdreambooth.data.dataset import ConceptData, DreamBoothDataset
    from ppdreambooth.data.images import list_image_files
    from ppdreambooth.data.photos import load_image_set

    files = list_image_files(photos)
    instance = load_image_set(files, "a photo of sks dog", model.tokenize, lambda h, w: (64, 64))
    prior = load_image_set(files[::-1], "a photo of dog", model.tokenize, lambda h, w: (64, 64))
    return DreamBoothDataset([ConceptData(instance, prior)], center_crop=True, random_flip=False,
                             size_conditioning=model.family.size_conditioning)


def loss_of(model, batch):
    paddle.seed(11)
    with paddle.no_grad():
        return model(**batch)["loss"].numpy()
