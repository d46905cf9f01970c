"""Every bad input a clear message: exit status 2, the culprit named, no traceback, no model loaded, nothing
written; and valid but unusual input (non-ASCII paths with spaces, odd image modes, a corrupt file among
good ones) trains. One case per row of the README's "When things go wrong" table, and more."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from helpers.photos import write_photos
from helpers.runs import run_module, train_argv
from ppdreambooth import train


def replace(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def model_without_index(tiny_model, tmp_path):
    folder = tmp_path / "no-index"
    shutil.copytree(tiny_model, folder)
    os.remove(folder / "model_index.json")
    return str(folder)


def bad_config(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"resolution": 64,')
    return str(path)


# (case, how to make the argv from the good one, what the message must say)
CASES = [
    ("missing photo folder", lambda a, t, m: replace(a, "--instance_data_dir", str(t / "nope")),
     "is not a folder"),
    ("non-numeric value", lambda a, t, m: replace(a, "--max_train_steps", "many"), "invalid int value"),
    ("misspelt flag", lambda a, t, m: a + ["--learnig_rate", "1e-4"], "Did you mean 'learning_rate'"),
    ("resolution not a multiple of 8", lambda a, t, m: replace(a, "--resolution", "60"), "multiple of 8"),
    ("LoRA rank 0", lambda a, t, m: a + ["--lora_rank", "0"], "--lora_rank 0 is out of range: it must be an integer >= 1 and <= 4,096"),
    ("negative noise offset", lambda a, t, m: a + ["--noise_offset", "-1"], "--noise_offset -1.0 is out of range: it must be a number >= 0 and <= 1"),
    ("EMA decay above 1", lambda a, t, m: a + ["--use_ema", "--ema_decay", "1.5"], "--ema_decay 1.5 is out of range"),
    ("zero validation steps", lambda a, t, m: a + ["--validation_steps", "0"], "--validation_steps 0 is out of range"),
    ("unknown export format", lambda a, t, m: a + ["--export_formats", "onnx"], "unknown format 'onnx'"),
    ("unknown logger", lambda a, t, m: a + ["--report_to", "mlflow"], "--report_to 'mlflow' is not supported"),
    ("fp16 and bf16", lambda a, t, m: a + ["--fp16", "--bf16"], "--fp16 and --bf16 are exclusive"),
    ("fp16 on a CPU", lambda a, t, m: a + ["--mixed_precision", "fp16"], "--fp16 (--mixed_precision fp16) needs a GPU"),
    ("alias conflict", lambda a, t, m: a + ["--per_device_train_batch_size", "4"], "same setting"),
    ("prior without class prompt", lambda a, t, m: a + ["--with_prior_preservation", "--class_data_dir", str(t / "c")],
     "--class_prompt"),
    ("cached latents with random crops", lambda a, t, m: a + ["--cache_latents"], "--cache_latents cannot reproduce"),
    ("both caching switches", lambda a, t, m: a + ["--cache_latents", "--center_crop", "--no_cache_latents"],
     "contradict"),
    ("pickled single file", lambda a, t, m: replace(a, "--pretrained_model_name_or_path", str(t / "m.ckpt")),
     "does not exist"),
    ("single file without its config", lambda a, t, m: replace(a, "--pretrained_model_name_or_path",
                                                               str(_touch(t / "m.safetensors"))), "--single_file_config"),
    ("folder without model_index.json", lambda a, t, m: replace(a, "--pretrained_model_name_or_path",
                                                                model_without_index(m, t)), "pass --model_family"),
    ("not a path nor a hub id", lambda a, t, m: replace(a, "--pretrained_model_name_or_path", "a/b/c"),
     "neither a model folder nor a hub id"),
    ("broken JSON config", lambda a, t, m: [bad_config(t)] + a, "is not valid JSON"),
    ("missing JSON config", lambda a, t, m: [str(t / "none.json")] + a, "does not exist"),
    ("flow option on SD", lambda a, t, m: a + ["--weighting_scheme", "mode"], "flow-matching (SD3) option"),
    ("T5 length out of range", lambda a, t, m: a + ["--max_sequence_length", "1000"],
     "--max_sequence_length 1000 is out of range: it must be an integer >= 1 and <= 512"),
    ("base prediction without LoRA", lambda a, t, m: a + ["--with_prior_preservation", "--class_prompt", "a dog",
                                                         "--prior_preservation_mode", "base_prediction"],
     "add --use_lora"),
    ("resume from a folder that is no checkpoint", lambda a, t, m: a + ["--resume_from_checkpoint", str(t)],
     "not a complete checkpoint"),
]


def _non_utf8_caption(args, tmp_path):
    photos = tmp_path / "captioned"
    shutil.copytree(args[args.index("--instance_data_dir") + 1], photos)
    (photos / "photo-0.txt").write_bytes(b"\xff\xfe a dog")
    return replace(args, "--instance_data_dir", str(photos))


def _output_dir_is_a_file(args, tmp_path):
    _touch(tmp_path / "a-file")
    return replace(args, "--output_dir", str(tmp_path / "a-file"))


def _damaged_model(tiny_model, tmp_path, damage):
    """A copy of the tiny model with one file damaged by `damage(folder)`."""
    folder = tmp_path / "damaged-model"
    shutil.copytree(tiny_model, folder)
    damage(folder)
    return str(folder)


def _cut_short(path):
    path.write_bytes(path.read_bytes()[:5000])


def _photos_of(args):
    return args[args.index("--instance_data_dir") + 1]


def _two_concepts_one_class_folder(args, tmp_path):
    photos = _photos_of(args)
    concepts = [{"instance_data_dir": photos, "instance_prompt": "a photo of sks dog",
                 "class_data_dir": str(tmp_path / "cls"), "class_prompt": "a photo of dog"},
                {"instance_data_dir": photos, "instance_prompt": "a photo of zwx cat",
                 "class_data_dir": str(tmp_path / "cls"), "class_prompt": "a photo of cat"}]
    argv = list(args)
    for flag in ("--instance_data_dir", "--instance_prompt"):
        del argv[argv.index(flag):argv.index(flag) + 2]
    return argv + ["--concepts", json.dumps(concepts), "--with_prior_preservation"]


CASES += [
    ("caption file not UTF-8", lambda a, t, m: _non_utf8_caption(a, t), "is not UTF-8 text"),
    ("output folder is a file", lambda a, t, m: _output_dir_is_a_file(a, t), "is a file, not a folder"),
    # numbers (every numeric flag: tests/test_ranges.py)
    ("batch size 0", lambda a, t, m: replace(a, "--train_batch_size", "0"),
     "--train_batch_size 0 is out of range: it must be an integer >= 1"),
    ("negative learning rate", lambda a, t, m: replace(a, "--learning_rate", "-1"),
     "--learning_rate -1.0 is out of range: it must be a number > 0 and <= 10"),
    ("learning rate not a number", lambda a, t, m: replace(a, "--learning_rate", "nan"),
     "--learning_rate nan is out of range"),
    ("a step count beyond reason", lambda a, t, m: replace(a, "--max_train_steps", str(10**12)),
     "--max_train_steps 1000000000000 is out of range"),
    # folders that overlap
    ("output folder inside the photo folder", lambda a, t, m: replace(a, "--output_dir", _photos_of(a) + "/out"),
     "is inside the photo folder"),
    ("output folder is the photo folder", lambda a, t, m: replace(a, "--output_dir", _photos_of(a)),
     "is the photo folder"),
    ("class folder is the photo folder", lambda a, t, m: a + ["--with_prior_preservation", "--class_prompt", "a dog",
                                                             "--class_data_dir", _photos_of(a)],
     "class images would be generated among the subject's photos"),
    ("output folder inside the class folder", lambda a, t, m: replace(a, "--output_dir", str(t / "cls" / "out")) + [
        "--with_prior_preservation", "--class_prompt", "a dog", "--class_data_dir", str(t / "cls")],
     "is inside the class folder"),
    ("class folder is a file", lambda a, t, m: a + ["--with_prior_preservation", "--class_prompt", "a dog",
                                                   "--class_data_dir", str(_touch(t / "cls-file"))],
     "--class_data_dir " + "{tmp}/cls-file is a file, not a folder"),
    ("one class folder, two class prompts", lambda a, t, m: _two_concepts_one_class_folder(a, t),
     "share the class folder"),
    # a damaged base model
    ("model_index.json not JSON", lambda a, t, m: replace(a, "--pretrained_model_name_or_path", _damaged_model(
        m, t, lambda f: (f / "model_index.json").write_text("{"))), "model_index.json is not valid JSON"),
    ("a component's config not JSON", lambda a, t, m: replace(a, "--pretrained_model_name_or_path", _damaged_model(
        m, t, lambda f: (f / "unet" / "config.json").write_text("{'"))), "unet/config.json is not valid JSON"),
    ("tokenizer folder missing", lambda a, t, m: replace(a, "--pretrained_model_name_or_path", _damaged_model(
        m, t, lambda f: shutil.rmtree(f / "tokenizer"))), "lacks tokenizer/"),
    ("weight file missing", lambda a, t, m: replace(a, "--pretrained_model_name_or_path", _damaged_model(
        m, t, lambda f: os.remove(f / "vae" / "diffusion_paddle_model.safetensors"))), "vae/ of"),
    ("weight file cut short", lambda a, t, m: replace(a, "--pretrained_model_name_or_path", _damaged_model(
        m, t, lambda f: _cut_short(f / "unet" / "diffusion_paddle_model.safetensors"))),
     "unet/diffusion_paddle_model.safetensors of"),
    ("replacement VAE folder missing", lambda a, t, m: a + ["--pretrained_vae_model_name_or_path", str(t / "nope")],
     "is not a VAE folder (no config.json)"),
    ("replacement VAE is another model", lambda a, t, m: a + ["--pretrained_vae_model_name_or_path",
                                                             os.path.join(m, "unet")],
     "holds a UNet2DConditionModel, not a VAE (AutoencoderKL)"),
    ("tokenizer folder without a tokenizer", lambda a, t, m: a + ["--tokenizer_name", os.path.join(m, "unet")],
     "is not a CLIP tokenizer folder (it lacks vocab.json and merges.txt)"),
    # prompts
    ("empty instance prompt", lambda a, t, m: replace(a, "--instance_prompt", "   "), "--instance_prompt is empty"),
    ("empty class prompt", lambda a, t, m: a + ["--with_prior_preservation", "--class_prompt", " ",
                                               "--class_data_dir", str(t / "cls")],
     "--with_prior_preservation needs --class_prompt"),
]


def snapshot(folder):
    """Every file under `folder` with its size and modification time."""
    return {os.path.join(root, name): (os.path.getsize(os.path.join(root, name)),
                                       os.path.getmtime(os.path.join(root, name)))
            for root, _, names in os.walk(folder) for name in names}


def _touch(path):
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("make, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_bad_input_stops_early_naming_the_culprit(make, message, tiny_model, photos, tmp_path, capsys,
                                                       no_model_loading):
    out = tmp_path / "out"
    argv = make(train_argv(tiny_model, photos, out), tmp_path, tiny_model)
    before = snapshot(tmp_path)
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before  # nothing written, in the photo folder or anywhere else


def test_a_truncated_weight_file_is_named_before_any_model_loads(tiny_model, photos, tmp_path, capsys,
                                                                   no_model_loading):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model, damaged)
    weights = damaged / "unet" / "diffusion_paddle_model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:size // 2])
    assert train.main(train_argv(str(damaged), photos, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert (f"unet/diffusion_paddle_model.safetensors of {damaged} is cut short: {size // 2:,} of {size:,} bytes"
            in err
            and "fetch the model again" in err and "Traceback" not in err), err


def test_loading_names_the_damaged_file_too(tiny_model, tmp_path):
    """Where only loading meets the damage (a hub snapshot in the cache), the message still names the file."""
    from ppdreambooth.errors import ConfigError
    from ppdreambooth.families import get_family
    from ppdreambooth.families.loading import load_component

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model, damaged)
    _cut_short(damaged / "vae" / "diffusion_paddle_model.safetensors")
    with pytest.raises(ConfigError, match="vae/diffusion_paddle_model.safetensors is cut short"):
        load_component(str(damaged), "vae", get_family("sd"))


@pytest.mark.slow
def test_unusual_but_valid_input_trains(tiny_model, tmp_path):
    """Non-ASCII folder names with spaces, odd image modes (RGBA, 16-bit grey, palette, CMYK), a caption file,
    stray non-image files and one corrupt image among the good ones."""
    photos = tmp_path / "фото моей собаки" / "sks dog photos"
    write_photos(photos, count=2)
    rng = np.random.RandomState(1)
    Image.fromarray(rng.randint(0, 255, (80, 96, 4)).astype(np.uint8), "RGBA").save(photos / "rgba.png")
    Image.fromarray((rng.rand(80, 96) * 65535).astype(np.uint16)).save(photos / "grey16.png")
    Image.fromarray(rng.randint(0, 255, (80, 96, 3)).astype(np.uint8)).convert("P").save(photos / "palette.png")
    Image.fromarray(rng.randint(0, 255, (80, 96, 3)).astype(np.uint8)).convert("CMYK").save(photos / "cmyk.jpg")
    (photos / "broken.jpg").write_bytes(b"not an image")
    (photos / ".DS_Store").write_bytes(b"\x00")
    (photos / "notes.txt").write_text("my dog")
    (photos / "rgba.txt").write_text("{instance_prompt} on grass")
    out = tmp_path / "résultats du chien"
    result = run_module(["-m", "ppdreambooth.train", *train_argv(tiny_model, str(photos), out, steps=2)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "broken.jpg" in result.stdout + result.stderr  # skipped with a warning that names it
    assert (out / "model_index.json").is_file()
    card = json.dumps((out / "README.md").read_text())
    assert "sks dog photos" in card
