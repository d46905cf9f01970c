"""Pivotal tuning (--train_text_encoder_ti): the new tokens' lookup, their freeze and the prompt memo after it,
checkpoints/EMA/resume across the freeze, the saved file in ppdiffusers' and diffusers' load_textual_inversion,
the kohya bundle, and the refusals."""
import os
import shutil
from types import SimpleNamespace

import numpy as np
import paddle
import pytest

from helpers.models import make_model
from helpers.runs import client_script, run_module, train_argv, truncate_run_to
from ppdreambooth import train
from ppdreambooth.batch import token_key

PIVOTAL = ["--train_text_encoder_ti", "--num_new_tokens_per_abstraction", "2", "--train_text_encoder_ti_frac", "0.5"]
PROMPT = "a photo of <s0><s1> dog"


def pivotal_model(path, **kw):
    return make_model(path, train_text_encoder_ti=True, num_new_tokens_per_abstraction=2, **kw)


def tokens_of(model, prompt):
    return {k: paddle.to_tensor(v[None]) for k, v in model.tokenize(prompt).items()}


# ----- the lookup -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_new_ids_read_the_new_vectors_and_only_they_get_gradients(family, request):
    model = pivotal_model(request.getfixturevalue({"sd": "tiny_model", "sdxl": "tiny_sdxl_model",
                                                   "sd3": "tiny_sd3_model"}[family]))
    tokens = model.pivotal_tokens
    names = list(model.family.textual_inversion_keys)
    assert [n for n, _ in model.trainable_named_parameters() if n.startswith("pivotal")] == [
        f"pivotal_tokens.{n}" for n in names]
    for n, name in enumerate(names):
        encoder, tokenizer = getattr(model, name), getattr(model, model.family.tokenizers[n])
        offset = tokens.offsets[name]
        assert tokenizer.convert_tokens_to_ids(["<s0>", "<s1>"]) == [offset, offset + 1]
        table = encoder.get_input_embeddings()
        assert table.weight.shape[0] == offset and table.weight.stop_gradient  # never resized, never trained
        ids = paddle.to_tensor([[3, offset, offset + 1, 7]])
        looked_up = table(ids).numpy()[0]
        vectors, rows = getattr(tokens, name).numpy(), table.weight.numpy()
        np.testing.assert_array_equal(looked_up, np.stack([rows[3], vectors[0], vectors[1], rows[7]]))
        # random normal with the spread of the existing rows (as diffusers' advanced script starts them)
        assert 0.3 < vectors.std() / rows.std() < 3.0
    ids = model.tokenize(PROMPT)[token_key(0)]
    assert tokens.offsets[names[0]] in ids and tokens.offsets[names[0]] + 1 in ids
    out = model.encode_prompts(tokens_of(model, PROMPT))
    out["prompt_embeds"].sum().backward()
    for name in names:
        grad = getattr(tokens, name).grad
        assert grad is not None and np.abs(grad.numpy()).min() > 0  # both tokens are in the prompt
        assert getattr(model, name).get_input_embeddings().weight.grad is None


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_initializer_concept_starts_each_token_at_the_concepts_rows_in_turn(family, request):
    model = pivotal_model(request.getfixturevalue({"sd": "tiny_model", "sdxl": "tiny_sdxl_model",
                                                   "sd3": "tiny_sd3_model"}[family]), initializer_concept="dog")
    for n, name in enumerate(model.family.textual_inversion_keys):
        tokenizer = getattr(model, model.family.tokenizers[n])
        ids = tokenizer("dog", add_special_tokens=False)["input_ids"]  # the tiny tokenizers read characters: 3 ids
        assert len(ids) == 3
        rows = getattr(model, name).get_input_embeddings().weight.numpy()
        vectors = getattr(model.pivotal_tokens, name).numpy()
        np.testing.assert_array_equal(vectors, rows[ids[:2]])  # <s0> = 'd', <s1> = 'o'
    one = pivotal_model(request.getfixturevalue({"sd": "tiny_model", "sdxl": "tiny_sdxl_model",
                                                 "sd3": "tiny_sd3_model"}[family]), initializer_concept="x")
    vectors = one.pivotal_tokens.text_encoder.numpy()
    np.testing.assert_array_equal(vectors[0], vectors[1])  # a one-token concept starts both tokens at its row


def test_full_text_encoder_training_keeps_the_table_frozen(tiny_model):
    model = pivotal_model(tiny_model, train_text_encoder=True)
    trained = {n for n, _ in model.trainable_named_parameters()}
    assert "pivotal_tokens.text_encoder" in trained
    assert not any("token_embedding" in n for n in trained)
    assert any(n.startswith("text_encoder.") for n in trained)


# ----- the freeze and the prompt memo ---------------------------------------------------------------------------
def count_encoder_calls(encoder):
    calls = []
    encoder.register_forward_pre_hook(lambda layer, inputs: calls.append(1))
    return calls


def test_prompts_are_encoded_each_step_until_the_freeze_and_once_after(tiny_model):
    from ppdreambooth.training.callbacks import PivotalFreezeCallback

    model = pivotal_model(tiny_model)
    calls = count_encoder_calls(model.text_encoder)
    callback = PivotalFreezeCallback(model)
    state = SimpleNamespace(max_steps=4, global_step=0)
    callback.on_train_begin(None, state, None)
    assert callback.freeze_step == 2 and not model.pivotal_tokens.frozen and model.prompts_train()
    tokens = tokens_of(model, PROMPT)
    for step in (1, 2):
        model.encode_prompts(tokens)
        assert len(calls) == step  # encoded each step while the tokens train
        state.global_step = step
        callback.on_step_end(None, state, None)
    assert model.pivotal_tokens.frozen and not model.prompts_train()
    assert model.pivotal_tokens.text_encoder.optimize_attr["learning_rate"] == 0.0
    first = model.encode_prompts(tokens)["prompt_embeds"]
    again = model.encode_prompts(tokens)["prompt_embeds"]
    assert len(calls) == 3  # one encoding after the freeze, then the memo
    assert first.stop_gradient and np.array_equal(first.numpy(), again.numpy())
    batch = {k: paddle.concat([v, v]) for k, v in tokens.items()}
    assert np.array_equal(model.encode_prompts(batch)["prompt_embeds"].numpy()[1], first.numpy()[0])
    assert len(calls) == 3
    with paddle.no_grad():
        direct = model.text_encoder(tokens[token_key(0)])[0]
    np.testing.assert_array_equal(first.numpy(), direct.numpy())


def test_a_resume_past_the_freeze_freezes_before_the_first_step(tiny_model):
    from ppdreambooth.training.callbacks import PivotalFreezeCallback

    model = pivotal_model(tiny_model)
    PivotalFreezeCallback(model).on_train_begin(None, SimpleNamespace(max_steps=10, global_step=7), None)
    assert model.pivotal_tokens.frozen and model.__dict__.get("_prompt_memo") == {}


# ----- refusals -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--train_text_encoder_ti_frac", "0"], "--train_text_encoder_ti_frac"),
    (["--train_text_encoder_ti_frac", "1.5"], "--train_text_encoder_ti_frac"),
    (["--num_new_tokens_per_abstraction", "0"], "--num_new_tokens_per_abstraction"),
    (["--token_abstraction", "zwx"], "'zwx' does not appear (as a word) in the instance prompt"),
    (["--token_abstraction", "two words"], "must be one word"),
    (["--train_text_encoder_ti_frac", "0.1"], "freezes the new tokens at step 0"),
    (["--initializer_concept", " "], "--initializer_concept is empty"),
])
def test_bad_pivotal_values_are_refused_before_any_model_loads(extra, message, tiny_model, photos, tmp_path, capsys,
                                                              no_model_loading):
    assert train.main(train_argv(tiny_model, photos, tmp_path / "out", extra=["--train_text_encoder_ti", *extra])) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_the_header_says_where_the_tokens_start():
    from ppdreambooth.config.arguments import ModelArguments
    from ppdreambooth.training.console import pivotal_line

    args = SimpleNamespace(max_steps=10)
    plain = ModelArguments(pretrained_model_name_or_path="m", train_text_encoder_ti=True)
    assert pivotal_line(plain, args) == ["  pivotal:   'sks' -> <s0><s1> in the instance prompts; the new tokens train "
                                         "until step 5, then freeze"]
    concept = ModelArguments(pretrained_model_name_or_path="m", train_text_encoder_ti=True, initializer_concept="dog")
    assert "the new tokens train from 'dog' until step 5" in pivotal_line(concept, args)[0]


def test_an_initializer_concept_without_pivotal_tuning_is_refused(tiny_model, photos, tmp_path, capsys,
                                                                  no_model_loading):
    assert train.main(train_argv(tiny_model, photos, tmp_path / "out", extra=["--initializer_concept", "dog"])) == 2
    err = capsys.readouterr().err
    assert "it needs --train_text_encoder_ti" in err and "Traceback" not in err, err


def test_token_strings_the_tokenizer_already_has_are_refused(tiny_model, photos, tmp_path, capsys, no_model_loading):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "tokenizer" / "added_tokens.json").write_text('{"<s1>": 514}')
    assert train.main(train_argv(str(model), photos, tmp_path / "out", extra=["--train_text_encoder_ti"])) == 2
    err = capsys.readouterr().err
    assert "already has <s1>" in err and "Traceback" not in err, err


def test_the_abstraction_is_replaced_as_a_word_only():
    from ppdreambooth.modeling.pivotal import PivotalSpec

    spec = PivotalSpec("sks", 3)
    assert spec.apply("a photo of sks dog, sks") == "a photo of <s0><s1><s2> dog, <s0><s1><s2>"
    assert spec.apply("asks tasks sksx") == "asks tasks sksx"
    assert spec.apply(spec.apply("sks")) == "<s0><s1><s2>"
    assert spec.freeze_step(10) == 5 and PivotalSpec("sks", 2, 1.0).freeze_step(7) == 7


# ----- training runs --------------------------------------------------------------------------------------------
def checkpoint_state(run, step):
    return {k: v.numpy() for k, v in paddle.load(str(run / f"checkpoint-{step}" / "model_state.pdparams")).items()}


def embeddings(run):
    from safetensors.numpy import load_file

    return load_file(str(run / f"{run.name}_emb.safetensors"))


def train_ok(argv):
    result = run_module(["-m", "ppdreambooth.train", *argv])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_lora_run_trains_the_tokens_until_the_freeze_and_resumes_exactly_across_it(tiny_model, photos, tmp_path):
    extra = ["--use_lora", *PIVOTAL, "--use_ema", "--ema_decay", "0.5", "--checkpointing_steps", "1"]
    full = tmp_path / "full"
    result = train_ok(train_argv(tiny_model, photos, full, steps=4, extra=extra))
    assert "token norm" in result.stdout and "'sks' -> <s0><s1>" in result.stdout
    states = {s: checkpoint_state(full, s) for s in (1, 2, 3, 4)}
    vectors = {s: states[s]["pivotal_tokens.text_encoder"] for s in states}
    assert not np.array_equal(vectors[1], vectors[2])  # trained up to int(0.5 x 4) = 2
    assert np.array_equal(vectors[2], vectors[3]) and np.array_equal(vectors[3], vectors[4])  # frozen after
    lora = [k for k in states[4] if "lora" in k]
    assert lora and not np.array_equal(states[3][lora[0]], states[4][lora[0]])  # the LoRA keeps training
    ema = paddle.load(str(full / "checkpoint-4" / "ema_state.pdparams"), return_numpy=True)
    saved = embeddings(full)
    assert np.array_equal(saved["clip_l"], ema["shadow"]["pivotal_tokens.text_encoder"])  # the output is the EMA
    for step in (1, 3):  # a checkpoint before the freeze, one after it
        resumed = tmp_path / f"from-{step}"
        truncate_run_to(full, step, resumed)
        train_ok(train_argv(tiny_model, photos, resumed, steps=4,
                            extra=extra + ["--resume_from_checkpoint", "latest"]))
        again = checkpoint_state(resumed, 4)
        for k in states[4]:
            np.testing.assert_allclose(again[k], states[4][k], rtol=0, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(embeddings(resumed)["clip_l"], saved["clip_l"], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_full_fine_tune_keeps_every_original_row_and_the_file_loads_in_ppdiffusers(tiny_model, photos, tmp_path):
    from ppdiffusers import StableDiffusionPipeline
    from safetensors.numpy import load_file

    out = tmp_path / "full"
    train_ok(train_argv(tiny_model, photos, out, steps=2, extra=[*PIVOTAL, "--train_text_encoder",
                                                                   "--checkpointing_steps", "2"]))
    base = load_file(os.path.join(tiny_model, "text_encoder", "model.safetensors"))
    trained = load_file(str(out / "text_encoder" / "model.safetensors"))
    table = [k for k in base if "token_embedding" in k][0]
    assert np.array_equal(trained[table], base[table])  # every original row bit-identical
    assert any(not np.array_equal(trained[k], base[k]) for k in base if k != table)  # the encoder did train
    assert "<s0>" not in StableDiffusionPipeline.from_pretrained(str(out)).tokenizer.get_vocab()  # base tokenizer
    assert_file_loads_like_the_trained_encoder(str(out), out, tiny_model, extra={"train_text_encoder": True})


def assert_file_loads_like_the_trained_encoder(pipeline_dir, run, base_model, extra=None):
    """The card's loading code in ppdiffusers (SD3: ppdreambooth's loader) gives the same encoder outputs as the
    trained model (its final weights = the last checkpoint's) for a prompt with the new tokens."""
    import ppdiffusers
    from safetensors.paddle import load_file

    from ppdreambooth.modeling.pivotal import load_into_pipeline

    model = pivotal_model(base_model, **(extra or {}))
    last = max(int(n.split("-")[1]) for n in os.listdir(run) if n.startswith("checkpoint-"))
    model.set_state_dict(paddle.load(str(run / f"checkpoint-{last}" / "model_state.pdparams")))
    with paddle.no_grad():
        expected = model.encode_prompts(tokens_of(model, PROMPT))
    family = model.family
    pipe = getattr(ppdiffusers, family.pipeline_class).from_pretrained(pipeline_dir, **{
        k: v for k, v in family.pipeline_extras.items() if k != "feature_extractor"})
    state = load_file(str(run / f"{run.name}_emb.safetensors"))
    if not family.textual_inversion_loader:
        load_into_pipeline(pipe, str(run / f"{run.name}_emb.safetensors"), family.textual_inversion_keys)
    for n, (encoder, key) in enumerate(family.textual_inversion_keys.items() if family.textual_inversion_loader
                                       else ()):
        tokenizer = "tokenizer" if n == 0 else f"tokenizer_{n + 1}"
        pipe.load_textual_inversion(state[key], token=["<s0>", "<s1>"], text_encoder=getattr(pipe, encoder),
                                    tokenizer=getattr(pipe, tokenizer))
    tokens = {token_key(n): paddle.to_tensor(getattr(pipe, name)(PROMPT, padding="max_length", max_length=77,
                                                                  truncation=True, return_tensors="np").input_ids)
              for n, name in enumerate(family.tokenizers)}
    for n in range(len(family.tokenizers)):
        np.testing.assert_array_equal(tokens[token_key(n)].numpy()[0], model.tokenize(PROMPT)[token_key(n)])
    with paddle.no_grad():
        got = family.encode_prompt({n: getattr(pipe, n) for n in family.text_encoders}, tokens,
                                   model.denoiser.config)
    for k in expected:
        np.testing.assert_allclose(got[k].numpy(), expected[k].numpy(), rtol=0, atol=1e-6, err_msg=k)
    return expected


@pytest.mark.slow
def test_sdxl_lora_run_saves_both_encoders_tokens_for_ppdiffusers_and_the_kohya_bundle(tiny_sdxl_model, photos,
                                                                                      tmp_path):
    from safetensors.numpy import load_file

    out = tmp_path / "sdxl"
    train_ok(train_argv(tiny_sdxl_model, photos, out, steps=2, extra=[
        "--use_lora", *PIVOTAL, "--export_formats", "kohya", "--checkpointing_steps", "1"]))
    first, second = checkpoint_state(out, 1), checkpoint_state(out, 2)
    saved = embeddings(out)
    assert set(saved) == {"clip_l", "clip_g"}
    for name, key in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        assert np.array_equal(saved[key], second[f"pivotal_tokens.{name}"])
    paddle.seed(7)  # the run's seed: the same LoRA and token start as the run's
    start = pivotal_model(tiny_sdxl_model, use_lora=True).pivotal_tokens
    for name in ("text_encoder", "text_encoder_2"):
        moved = np.abs(first[f"pivotal_tokens.{name}"] - getattr(start, name).numpy())
        assert 0 < moved.max() <= 1.001e-3  # trained at step 1: Adam's first step moves each value by <= the rate
        assert np.array_equal(first[f"pivotal_tokens.{name}"], second[f"pivotal_tokens.{name}"])  # frozen after it
    expected = assert_file_loads_like_the_trained_encoder(tiny_sdxl_model, out, tiny_sdxl_model)
    assert set(expected) == {"prompt_embeds", "pooled_prompt_embeds"}
    kohya = load_file(str(out / "export-kohya" / "lora_kohya.safetensors"))
    assert np.array_equal(kohya["bundle_emb.sks.clip_l"], saved["clip_l"])
    assert np.array_equal(kohya["bundle_emb.sks.clip_g"], saved["clip_g"])


@pytest.mark.slow
def test_the_file_loads_in_diffusers_with_the_same_encoder_output(tiny_model, photos, tmp_path, torch_python):
    """Full fine-tune exported for diffusers (the emb file copied beside it); diffusers' load_textual_inversion
    in the PyTorch client gives the text-encoder output ppdiffusers gives."""
    from safetensors.numpy import load_file

    out = tmp_path / "sd"
    train_ok(train_argv(tiny_model, photos, out, steps=2, extra=[*PIVOTAL, "--export_formats", "diffusers",
                                                                   "--checkpointing_steps", "2"]))
    expected = assert_file_loads_like_the_trained_encoder(str(out), out, tiny_model)
    exported = out / "export-diffusers"
    assert np.array_equal(load_file(str(exported / "sd_emb.safetensors"))["clip_l"], embeddings(out)["clip_l"])
    outputs = tmp_path / "torch.npz"
    client_script(torch_python, "textual_inversion_client.py", exported, exported / "sd_emb.safetensors", PROMPT,
                  outputs)
    got = np.load(outputs)
    np.testing.assert_array_equal(got["input_ids"][0], pivotal_model(tiny_model).tokenize(PROMPT)["input_ids"])
    np.testing.assert_allclose(got["hidden"], expected["prompt_embeds"].numpy(), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_generate_and_evaluate_load_the_tokens_and_rewrite_the_prompt(tiny_model, photos, tmp_path):
    out = tmp_path / "lora"
    train_ok(train_argv(tiny_model, photos, out, steps=2, extra=["--use_lora", *PIVOTAL]))
    result = run_module(["-m", "ppdreambooth.generate", "--model", tiny_model, "--lora", str(out), "--prompt",
                         "a photo of sks dog", "--num_images", "1", "--steps", "2", "--out", str(tmp_path / "gen")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded the new tokens <s0><s1>" in result.stdout
    assert any("s0-s1-dog" in name for name in os.listdir(tmp_path / "gen"))
    # evaluate: the trained model's prompts read the tokens, the base model's keep the word
    import ppdreambooth.evaluation.runs as runs

    seen = {}

    def record(pipe, prompts, *rest, **kw):
        seen.setdefault("tokens" if "<s0>" in pipe.tokenizer.get_vocab() else "plain", []).extend(prompts)
        return [None] * len(prompts)

    original = runs.generate_images
    runs.generate_images = record
    try:
        args = SimpleNamespace(model=tiny_model, lora=str(out), base=tiny_model, scheduler=None, model_family=None,
                               quiet=True, steps=1, height=None, width=None, guidance_scale=7.5, negative_prompt=None,
                               lora_scale=1.0)
        runs.generate_runs(args, ["a sks dog in the snow"], [0])
    finally:
        runs.generate_images = original
    assert seen == {"plain": ["a sks dog in the snow"], "tokens": ["a <s0><s1> dog in the snow"]}


def test_a_resume_with_other_pivotal_settings_is_refused():
    from ppdreambooth.training.resume_settings import differences

    saved = {"train_text_encoder_ti": True, "num_new_tokens_per_abstraction": 2}
    errors, _ = differences(saved, {"train_text_encoder_ti": True, "num_new_tokens_per_abstraction": 3}, "checkpoint-2")
    assert errors == ["--num_new_tokens_per_abstraction is 3 but checkpoint-2 was trained with 2"]
    errors, _ = differences(saved, {"train_text_encoder_ti": False, "num_new_tokens_per_abstraction": None}, "c")
    assert "--train_text_encoder_ti is off but c was trained with on" in errors


@pytest.mark.slow
def test_sd3_trains_the_clip_tokens_and_generate_reads_them(tiny_sd3_model, photos, tmp_path):
    out = tmp_path / "sd3"
    train_ok(train_argv(tiny_sd3_model, photos, out, steps=2, extra=["--use_lora", *PIVOTAL, "--checkpointing_steps",
                                                                     "1", "--validation_prompt", "a sks dog",
                                                                     "--validation_steps", "2",
                                                                     "--num_validation_images", "1"]))
    first, second = checkpoint_state(out, 1), checkpoint_state(out, 2)
    saved = embeddings(out)
    assert set(saved) == {"clip_l", "clip_g"}  # the two CLIP encoders; T5 has none
    paddle.seed(7)
    start = pivotal_model(tiny_sd3_model, use_lora=True).pivotal_tokens
    for name, key in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        moved = np.abs(first[f"pivotal_tokens.{name}"] - getattr(start, name).numpy())
        assert 0 < moved.max() <= 1.001e-3
        assert np.array_equal(first[f"pivotal_tokens.{name}"], second[f"pivotal_tokens.{name}"])
        assert np.array_equal(saved[key], second[f"pivotal_tokens.{name}"])
    expected = assert_file_loads_like_the_trained_encoder(tiny_sd3_model, out, tiny_sd3_model)
    assert set(expected) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert (out / "validation" / "step-2").is_dir()
    assert "load_into_pipeline" in (out / "README.md").read_text()
    result = run_module(["-m", "ppdreambooth.generate", "--model", tiny_sd3_model, "--lora", str(out), "--prompt",
                         "a photo of sks dog", "--num_images", "1", "--steps", "2", "--out", str(tmp_path / "gen")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded the new tokens <s0><s1>" in result.stdout
