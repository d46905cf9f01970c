"""`python -m ppdreambooth.evaluate`: the DreamBooth paper's fidelity metrics (DINO, CLIP-I, CLIP-T).

The metric definitions are checked by hand on a few embeddings and through the real encoders (tiny random
CLIP and DINO models built here: nothing is downloaded); the command runs on a full fine-tune and on a
LoRA trained for two steps. The DINO ViT port and the PyTorch-layout CLIP loading are compared with the
PyTorch client (transformers' ViTModel and CLIPModel) when PPDB_TORCH_PYTHON is set.
"""
import json
import os
import subprocess

import numpy as np
import paddle
import pytest
from PIL import Image

from helpers.photos import write_photos
from helpers.runs import ROOT, run_module, train_argv
from helpers.tiny_metrics import write_tiny_clip, write_tiny_dino
from ppdreambooth.evaluate import main
from ppdreambooth.evaluation.dino import load_dino, load_vit_weights, published_key
from ppdreambooth.evaluation.fidelity import (
    FidelityScorer,
    fidelity_scores,
    load_clip,
    mean_distinct_pairs_cosine,
    mean_paired_cosine,
    mean_pairwise_cosine,
)
from ppdreambooth.evaluation.model_files import read_torch_weights
from ppdreambooth.evaluation.preprocess import ImagePreprocess
from ppdreambooth.evaluation.prompts import PROMPTS_PATH, dreambench, resolve_prompts, spread
from ppdreambooth.evaluation.vit import ViTConfig, build_vit

VIT_CLIENT = os.path.join(ROOT, "tests", "helpers", "vit_client.py")


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    """(tiny CLIP folder, tiny DINO folder), random, made here."""
    root = tmp_path_factory.mktemp("metric_models")
    return write_tiny_clip(str(root / "clip")), write_tiny_dino(str(root / "dino"))


def load_images(folder):
    return [Image.open(os.path.join(folder, name)).convert("RGB") for name in sorted(os.listdir(folder))]


def cos(a, b):
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


# ----- the metric definitions -------------------------------------------------------------------------
def test_metric_definitions_equal_a_hand_computation():
    generated, real = np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[3.0, 4.0]])
    # normalised: (1, 0) and (0, 1) against (0.6, 0.8): cosines 0.6 and 0.8
    assert mean_pairwise_cosine(generated, real) == pytest.approx(0.7, abs=1e-12)
    real2 = np.array([[3.0, 4.0], [-1.0, 0.0]])  # adds cosines -1 and 0: (0.6 + 0.8 - 1 + 0) / 4
    assert mean_pairwise_cosine(generated, real2) == pytest.approx(0.1, abs=1e-12)
    images, texts = np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[2.0, 0.0], [0.0, 5.0]])
    assert mean_paired_cosine(images, texts) == pytest.approx((1 + 2 ** -0.5) / 2, abs=1e-12)  # only i with i
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # different pairs: 0, 1/sqrt2, 1/sqrt2
    assert mean_distinct_pairs_cosine(x) == pytest.approx(2 * 2 ** -0.5 / 3, abs=1e-12)
    assert mean_distinct_pairs_cosine(x[:1]) is None
    # scale does not matter (embeddings are normalised), order of pairs does not either
    assert mean_pairwise_cosine(7 * generated, 0.1 * real2[::-1]) == pytest.approx(0.1, abs=1e-12)
    scores = fidelity_scores(generated, real, images, real2, texts)
    assert scores == pytest.approx({"dino": 0.7, "clip_i": mean_pairwise_cosine(images, real2),
                                    "clip_t": (1 + 2 ** -0.5) / 2})
    assert mean_pairwise_cosine(real, real) == pytest.approx(1.0)  # identical embeddings
    with pytest.raises(ValueError):
        mean_paired_cosine(images, texts[:1])


def test_scores_through_the_encoders_identity_and_by_hand(metric_models, tmp_path):
    clip, dino = load_clip(metric_models[0]), load_dino(metric_models[1])
    photos = load_images(write_photos(tmp_path / "photos", count=3))

    one = FidelityScorer(clip, dino, photos[:1])
    same = one.score([[photos[0], photos[0].copy()]], ["a sks dog"])["overall"]
    assert same["dino"] == pytest.approx(1.0, abs=1e-6) and same["clip_i"] == pytest.approx(1.0, abs=1e-6)

    scorer = FidelityScorer(clip, dino, photos)
    dino_raw = dino[0].cls_features(dino[1](photos))
    clip_raw = clip.image_features(photos)
    text_raw = clip.text_features(["a sks dog on the beach", "a red sks dog"])
    # the set against itself: all n^2 pairs, the n self-pairs among them count 1
    whole = scorer.score([photos], ["a sks dog on the beach"])["overall"]
    reference = scorer.photo_reference()
    assert reference["dino"] == pytest.approx(np.mean([cos(dino_raw[i], dino_raw[j]) for i in range(3)
                                                       for j in range(3) if i != j]))
    assert whole["dino"] == pytest.approx((3 + 6 * reference["dino"]) / 9)
    assert whole["clip_i"] == pytest.approx((3 + 6 * reference["clip_i"]) / 9)
    # two prompts, one image each: every generated x real pair, and each image with its own prompt
    result = scorer.score([[photos[1]], [photos[2]]], ["a sks dog on the beach", "a red sks dog"])
    assert result["overall"]["dino"] == pytest.approx(np.mean([cos(dino_raw[i], dino_raw[j]) for i in (1, 2)
                                                               for j in range(3)]))
    assert result["overall"]["clip_i"] == pytest.approx(np.mean([cos(clip_raw[i], clip_raw[j]) for i in (1, 2)
                                                                 for j in range(3)]))
    by_hand = (cos(clip_raw[1], text_raw[0]) + cos(clip_raw[2], text_raw[1])) / 2
    assert result["overall"]["clip_t"] == pytest.approx(by_hand)
    assert result["per_prompt"][1]["clip_t"] == pytest.approx(cos(clip_raw[2], text_raw[1]))
    assert result["per_prompt"][0]["prompt"] == "a sks dog on the beach"


# ----- prompts ----------------------------------------------------------------------------------------
def test_dreambench_prompt_sets_ship_with_the_package(tmp_path):
    assert os.path.dirname(os.path.dirname(PROMPTS_PATH)) == os.path.join(ROOT, "ppdreambooth")
    data = dreambench()
    assert len(data["object"]) == len(data["live"]) == 25
    assert all(t.count("{}") == 1 for t in data["object"] + data["live"])
    assert data["object"][:10] == data["live"][:10] and data["object"][-5:] == data["live"][-5:]
    assert "a {} floating in an ocean of milk" in data["object"] and "a {} in a chef outfit" in data["live"]
    assert len(data["subjects"]) == 30 and data["live_classes"] == ["cat", "dog"]

    prompts, description = resolve_prompts("auto", None, "sks", "dog")
    assert len(prompts) == 25 and prompts[0] == "a sks dog in the jungle" and "wearing a red hat" in prompts[10]
    assert "live" in description
    prompts, _ = resolve_prompts("auto", None, "zwx", "teapot")
    assert prompts[-1] == "a cube shaped zwx teapot" and "a zwx teapot floating on top of water" in prompts
    subset, _ = resolve_prompts("object", None, "sks", "dog", num_prompts=5)
    assert subset == [prompts[i].replace("zwx teapot", "sks dog") for i in (0, 5, 10, 15, 20)]
    assert spread(range(4), 10) == [0, 1, 2, 3]

    own = tmp_path / "prompts.txt"
    own.write_text("# my prompts\n{} on a sofa\n\na drawing of {}\na plain prompt\n")
    assert resolve_prompts("auto", str(own), "sks", "toy")[0] == ["sks toy on a sofa", "a drawing of sks toy",
                                                                  "a plain prompt"]
    from ppdreambooth.errors import ConfigError

    with pytest.raises(ConfigError, match="--class_name"):
        resolve_prompts("auto", None, "sks", None)
    with pytest.raises(ConfigError, match="--class_name"):
        resolve_prompts("auto", str(own), "sks", None)


# ----- DINO and CLIP loading --------------------------------------------------------------------------
def test_dino_loads_the_published_layout(metric_models, tmp_path):
    model, preprocess = load_dino(metric_models[1])
    assert preprocess.size == (32, 32) and preprocess.crop is None and preprocess.mean[0] == 0.485
    file = read_torch_weights(metric_models[1])
    state = model.state_dict()
    np.testing.assert_array_equal(state["encoder.layer.1.attention.attention.query.weight"].numpy(),
                                  file["encoder.layer.1.attention.attention.query.weight"].T)  # [out, in] -> [in, out]
    np.testing.assert_array_equal(state["embeddings.patch_embeddings.projection.weight"].numpy(),
                                  file["embeddings.patch_embeddings.projection.weight"])
    photos = load_images(write_photos(tmp_path / "photos", count=2))
    pixels = preprocess(photos)
    assert pixels.shape == (2, 3, 32, 32)
    with paddle.no_grad():
        hidden = model(paddle.to_tensor(pixels)).numpy()
    assert hidden.shape == (2, 1 + 16, 24)
    np.testing.assert_allclose(model.cls_features(pixels), hidden[:, 0], rtol=1e-6)  # the CLS token

    # transformers 5's names, a `vit.` prefix and a pooler are read too; a missing tensor is an error
    assert published_key("layers.3.attention.q_proj.weight") == "encoder.layer.3.attention.attention.query.weight"
    assert published_key("layers.0.attention.o_proj.bias") == "encoder.layer.0.attention.output.dense.bias"
    assert published_key("layers.0.mlp.fc1.weight") == "encoder.layer.0.intermediate.dense.weight"
    assert published_key("layers.0.mlp.fc2.weight") == "encoder.layer.0.output.dense.weight"
    assert published_key("vit.embeddings.cls_token") == "embeddings.cls_token"
    assert published_key("pooler.dense.weight") is None
    config = ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                       image_size=32, patch_size=8)
    partial = {k: v for k, v in file.items() if "layernorm_after" not in k}
    with pytest.raises(ValueError, match="lack"):
        load_vit_weights(build_vit(config), partial)


def test_image_preprocessing_follows_the_model_configs():
    clip_defaults = ImagePreprocess(shortest_edge=224, crop=(224, 224), resample=3)
    old_clip = ImagePreprocess.from_config({"size": 224, "crop_size": 224, "do_center_crop": True}, clip_defaults)
    assert old_clip.shortest_edge == 224 and old_clip.crop == (224, 224)
    vit = ImagePreprocess.from_config({"size": 224, "resample": 2}, ImagePreprocess())
    assert vit.size == (224, 224) and vit.shortest_edge is None and vit.crop is None
    new = ImagePreprocess.from_config({"size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 16},
                                       "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, clip_defaults)
    image = Image.new("RGB", (40, 20), (255, 0, 128))  # wide: the short side becomes 16, then a 16x16 centre crop
    pixels = new([image])
    assert pixels.shape == (1, 3, 16, 16)
    np.testing.assert_allclose(pixels[0, :, 5, 5], [1.0, -1.0, 128 / 127.5 - 1], atol=1e-6)


def test_clip_loads_paddle_and_pytorch_layouts(metric_models, tmp_path):
    import shutil

    from ppdiffusers.transformers import CLIPModel

    paddle_clip = load_clip(metric_models[0])
    torch_folder = tmp_path / "clip_pytorch_layout"  # what transformers writes: model.safetensors, [out, in]
    CLIPModel.from_pretrained(metric_models[0]).save_pretrained(str(torch_folder), to_diffusers=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(metric_models[0], name), torch_folder)
    torch_clip = load_clip(str(torch_folder))
    photos = [Image.new("RGB", (40, 30), (10, 200, 30)), Image.new("RGB", (30, 30), (200, 20, 30))]
    np.testing.assert_allclose(torch_clip.image_features(photos), paddle_clip.image_features(photos), atol=1e-6)
    np.testing.assert_allclose(torch_clip.text_features(["a sks dog"]), paddle_clip.text_features(["a sks dog"]),
                               atol=1e-6)


# ----- the command ------------------------------------------------------------------------------------
def evaluate_argv(model, photos, out, metric_models, extra=()):
    return ["-m", "ppdreambooth.evaluate", "--model", str(model), "--instance_data_dir", str(photos),
            "--class_name", "dog", "--num_prompts", "2", "--num_images", "2", "--steps", "2",
            "--clip_model", metric_models[0], "--dino_model", metric_models[1], "--out", str(out), *extra]


def check_outputs(out, runs=("trained", "base")):
    metrics = json.loads((out / "metrics.json").read_text())
    for run in runs:
        assert set(metrics["metrics"][run]) == {"dino", "clip_i", "clip_t"}
        assert all(-1 <= v <= 1 for v in metrics["metrics"][run].values())
        assert sorted(os.listdir(out / "images" / run)) == ["00-00-seed0.png", "00-01-seed1.png",
                                                            "01-00-seed0.png", "01-01-seed1.png"]
    assert len(metrics["per_prompt"]) == 2 and metrics["settings"]["prompts"] == ["a sks dog in the jungle",
                                                                                  "a sks dog wearing a rainbow scarf"]
    assert metrics["paper"]["dreambooth_stable_diffusion"] == {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305}
    # 4 photos in one row of 2 x 2 cells, then a header line, then 2 prompt rows; 64 px images, 14 px labels
    assert Image.open(out / "grid.png").size == (2 * 2 * 64 + 8, 14 + 64 + 14 + 2 * (14 + 64))
    return metrics


def test_evaluate_a_full_fine_tune_against_its_base(tiny_model, photos, metric_models, tmp_path):
    out = tmp_path / "run"
    assert run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, photos, out, steps=2)]).returncode == 0
    result = run_module(evaluate_argv(out, photos, out / "evaluation", metric_models))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = check_outputs(out / "evaluation")
    assert metrics["settings"]["base"] == tiny_model  # read from the model card
    assert metrics["metrics"]["trained"] != metrics["metrics"]["base"]
    for line in ("DINO", "CLIP-I", "CLIP-T", "Your photos among themselves"):
        assert line in result.stdout
    assert f"{metrics['metrics']['trained']['dino']:.3f}" in result.stdout and "0.668" in result.stdout


def test_evaluate_a_lora_against_the_same_pipeline_without_adapters(tiny_model, photos, metric_models, tmp_path):
    out = tmp_path / "lora"
    argv = train_argv(tiny_model, photos, out, steps=2, extra=["--use_lora"])
    assert run_module(["-m", "ppdreambooth.train", *argv]).returncode == 0
    result = run_module(evaluate_argv(out, photos, tmp_path / "eval", metric_models))  # base from the card
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = check_outputs(tmp_path / "eval")
    assert (metrics["settings"]["model"], metrics["settings"]["lora"]) == (tiny_model, str(out))
    assert metrics["metrics"]["trained"] != metrics["metrics"]["base"]
    # the base images are the base model's own: the same as evaluating the base model itself
    alone = evaluate_argv(tiny_model, photos, tmp_path / "base_alone", metric_models, ["--no_base", "--quiet"])
    assert main(alone[2:]) == 0
    base_alone = json.loads((tmp_path / "base_alone" / "metrics.json").read_text())
    assert "base" not in base_alone["metrics"]
    assert base_alone["metrics"]["trained"] == pytest.approx(metrics["metrics"]["base"], abs=1e-9)
    for name in os.listdir(tmp_path / "eval" / "images" / "base"):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "eval" / "images" / "base" / name)),
                                      np.asarray(Image.open(tmp_path / "base_alone" / "images" / "trained" / name)))


@pytest.mark.parametrize("fixture", ["tiny_sdxl_model", "tiny_sd3_model"])
def test_evaluate_other_families(fixture, request, photos, metric_models, tmp_path):
    model = request.getfixturevalue(fixture)
    argv = evaluate_argv(model, photos, tmp_path / "eval", metric_models, ["--no_base", "--quiet", "--num_prompts", "1",
                                                                            "--num_images", "1", "--steps", "1"])
    assert main(argv[2:]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {"trained", "your_photos"} and len(metrics["settings"]["prompts"]) == 1


def test_evaluate_refuses_what_it_cannot_use(tiny_model, metric_models, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        main(evaluate_argv(tiny_model, tmp_path / "empty", tmp_path / "out", metric_models)[2:])
    assert e.value.code == 2 and "no photos" in capsys.readouterr().err
    lora = tmp_path / "lora_without_card"
    lora.mkdir()
    (lora / "paddle_lora_weights.safetensors").write_bytes(b"")
    photos = write_photos(tmp_path / "photos", count=1)
    with pytest.raises(SystemExit) as e:
        main(evaluate_argv(lora, photos, tmp_path / "out", metric_models)[2:])
    assert e.value.code == 2 and "--lora" in capsys.readouterr().err


# ----- the PyTorch client -----------------------------------------------------------------------------
@pytest.mark.slow
def test_dino_port_and_clip_loading_match_transformers(tmp_path):
    python = os.environ.get("PPDB_TORCH_PYTHON")
    if not python:
        pytest.skip("PPDB_TORCH_PYTHON is not set (bash tests/run.sh prepares the PyTorch client)")
    rng = np.random.RandomState(0)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, pixel_values=rng.standard_normal((3, 3, 32, 32)).astype("float32"),
             input_ids=np.array([[97, 5, 6, 7, 98, 98, 98], [97, 10, 11, 98, 98, 98, 98]], dtype="int64"))
    data = np.load(inputs)

    def client(*args):
        result = subprocess.run([python, VIT_CLIENT, *map(str, args)], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    client("vit", tmp_path / "vit", inputs, tmp_path / "vit.npz")
    want = np.load(tmp_path / "vit.npz")["last_hidden_state"]
    for layout in ("safetensors", "bin"):  # the published names (save_pretrained); transformers 5's (state_dict)
        model, _ = load_dino(str(tmp_path / "vit" / layout))
        with paddle.no_grad():
            got = model(paddle.to_tensor(data["pixel_values"])).numpy()
        assert np.abs(got - want).max() <= 1e-4, (layout, np.abs(got - want).max())
        np.testing.assert_allclose(model.cls_features(data["pixel_values"]), want[:, 0], atol=1e-4)

    client("clip", tmp_path / "clip", inputs, tmp_path / "clip.npz")
    from ppdreambooth.families.tiny import write_tiny_tokenizer

    write_tiny_tokenizer(str(tmp_path / "clip"))  # the inputs are token ids; load_clip wants a tokenizer
    clip = load_clip(str(tmp_path / "clip"))
    want = np.load(tmp_path / "clip.npz")
    with paddle.no_grad():
        image = clip.model.get_image_features(pixel_values=paddle.to_tensor(data["pixel_values"])).numpy()
        text = clip.model.get_text_features(input_ids=paddle.to_tensor(data["input_ids"])).numpy()
    assert np.abs(image - want["image_embeds"]).max() <= 1e-4
    assert np.abs(text - want["text_embeds"]).max() <= 1e-4
