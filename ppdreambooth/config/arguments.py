"""Training arguments: three dataclasses grouped by concern, plus the seed script's flag names.

`ModelArguments` (what to load and how the loss is formed), `DataArguments` (images, prompts, class
images, transforms) and `DreamBoothTrainingArguments` (PaddleNLP's `TrainingArguments` with the
DreamBooth defaults of the ppdiffusers `train_dreambooth.py` script). Flags that the seed script names
differently from the Trainer (`--train_batch_size`, `--max_train_steps`, ...) live in `SeedFlagAliases`
and are folded into the Trainer's field by `ppdreambooth.config.parsing.parse_args`.
"""
from __future__ import annotations

import difflib
import logging
import re
import os
from dataclasses import dataclass, field
from typing import List, Optional

from paddlenlp.trainer import TrainingArguments

from ppdreambooth.config.ranges import check_fields
from ppdreambooth.errors import ConfigError

logger = logging.getLogger(__name__)


# SD3 (flow matching): timestep densities logit_normal / mode / uniform, or uniform timesteps with the loss
# weights sigma_sqrt / cosmap / none (see ppdreambooth.modeling.losses)
FLOW_WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none")
EXPORT_FORMATS = ("diffusers", "single-file", "kohya", "merged")  # --export_formats, `export --format`
LOSS_TYPES = ("l2", "huber", "smooth_l1")  # --loss_type (see ppdreambooth.modeling.losses)
HUBER_SCHEDULES = ("constant", "exponential", "snr")  # --huber_schedule
LR_SCHEDULERS = ["linear", "cosine", "constant", "constant_with_warmup", "polynomial"]
# --optim; PaddleNLP has the first two; the others are plain strings for which the Trainer builds ppdreambooth's classes
OPTIMIZERS = ("adamw", "adafactor", "prodigy", "adamw_schedulefree", "adamw_8bit")
OWN_OPTIMIZERS = ("prodigy", "adamw_schedulefree", "adamw_8bit")
SCHEDULE_FREE_SCHEDULERS = ("constant", "constant_with_warmup")  # --optim adamw_schedulefree: constant after warmup
# --lora_layers and --text_encoder_lora_layers presets (what each adapts: ppdreambooth.modeling.lora_targets)
DENOISER_PRESETS = ("attn", "attn_ff", "all_linear")
TEXT_ENCODER_PRESETS = ("attn", "attn_mlp")


def base_prediction_prior_problem(use_lora: bool, train_text_encoder: bool,
                                  with_prior_preservation: bool = True) -> Optional[str]:
    """Why `--prior_preservation_mode base_prediction` cannot run with these settings (None: it can). Its prior
    target is the base model's prediction, which is the denoiser with its LoRA adapters switched off."""
    if not (use_lora and with_prior_preservation):
        return ("--prior_preservation_mode base_prediction needs --with_prior_preservation and --use_lora: it takes "
                "the base model's prediction with the LoRA adapters switched off; add --use_lora, or use the default "
                "class_images mode.")
    if train_text_encoder:
        return ("--prior_preservation_mode base_prediction switches off the denoiser's adapters only; with "
                "--train_text_encoder the prior target would not be the base model's. Drop one.")
    return None


@dataclass
class ModelArguments:
    pretrained_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Pipeline to fine-tune (SD 1.x/2.x, SDXL or SD3): a ppdiffusers or diffusers folder, or a hub id."},
    )
    revision: Optional[str] = field(default=None, metadata={"help": "Hub revision of the pretrained model."})
    model_family: Optional[str] = field(
        default=None,
        metadata={"help": "sd (1.x/2.x), sdxl or sd3. Unset: read from the model's model_index.json.",
                  "choices": [None, "sd", "sdxl", "sd3"]},
    )
    pretrained_vae_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "A VAE (folder or hub id) to use instead of the model's own, e.g. an fp16-fixed SDXL VAE."},
    )
    single_file_config: Optional[str] = field(
        default=None,
        metadata={"help": "With a single-file .safetensors checkpoint: a model folder or hub id of the same "
                          "architecture, for its configuration, tokenizer and scheduler."},
    )
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer to use instead of the model's `tokenizer/` folder."}
    )
    train_text_encoder: bool = field(
        default=False, metadata={"help": "Also train the text encoder (its LoRA adapters with --use_lora)."}
    )
    train_text_encoder_ti: bool = field(
        default=False, metadata={"help": "Pivotal tuning (SD 1.x/2.x, SDXL): replace --token_abstraction in the "
                                         "instance prompts by new tokens <s0><s1>... added to every CLIP encoder and "
                                         "trained as textual inversion beside the LoRA or full fine-tune, then frozen."}
    )
    token_abstraction: str = field(
        default="sks", metadata={"help": "With --train_text_encoder_ti: the identifier word of the instance prompt "
                                         "that the new tokens replace (in training, validation and generate prompts)."}
    )
    num_new_tokens_per_abstraction: int = field(
        default=2, metadata={"help": "With --train_text_encoder_ti: how many new tokens <s0>..<sN-1> replace it."}
    )
    train_text_encoder_ti_frac: float = field(
        default=0.5, metadata={"help": "With --train_text_encoder_ti: the new tokens train for the first "
                                       "int(frac x max_train_steps) steps, then freeze (0 < frac <= 1)."}
    )
    initializer_concept: Optional[str] = field(
        default=None,
        metadata={"help": "With --train_text_encoder_ti: start the new tokens at the embeddings of these words (e.g. "
                          "the class word, `dog`; token i starts at the concept's token i modulo its length), as "
                          "diffusers' advanced script does. Unset: random vectors with the spread of the existing "
                          "rows."},
    )
    use_lora: bool = field(
        default=False, metadata={"help": "Train LoRA adapters on the attention projections instead of all weights."}
    )
    lora_type: str = field(
        default="lora",
        metadata={"help": "With --use_lora: lora (the default), dora (DoRA: the adapted weight is renormalised per "
                          "output feature and scaled by a trained magnitude, one number per output feature; "
                          "diffusers' --use_dora), loha (LyCORIS LoHa: dW = (w1a w1b) * (w2a w2b) elementwise "
                          "* alpha/rank) or lokr (LyCORIS LoKr: dW = kron(w1, w2), w2 low rank when the rank is "
                          "small; see --lokr_factor). LoHa/LoKr load in ComfyUI/WebUI (export kohya) or merged, "
                          "not in diffusers.", "choices": ["lora", "dora", "loha", "lokr"]},
    )
    conv_rank: Optional[int] = field(
        default=None,
        metadata={"help": "With --use_lora: also adapt the UNet's 3x3 convolutions (resnets, down- and upsamplers; "
                          "kohya's and LyCORIS's conv_dim) at this rank: LoCon for --lora_type lora, LoHa/LoKr "
                          "for those types. Unset: attention projections only. Not "
                          "for SD3 (its transformer has no such convolutions)."},
    )
    conv_alpha: Optional[float] = field(
        default=None, metadata={"help": "Alpha of the --conv_rank adapters (scaled by alpha/rank). Default: "
                                        "--conv_rank."}
    )
    lokr_factor: int = field(
        default=-1,
        metadata={"help": "With --lora_type lokr: how each weight dimension is split for the Kronecker product, "
                          "LyCORIS's `factor`: -1 (the default) splits near the square root (128 -> 8 x 16), "
                          "f > 0 splits off f where it divides (128, 4 -> 4 x 32)."},
    )
    lora_rank: int = field(default=4, metadata={"help": "Rank of the LoRA matrices (also --rank)."})
    lora_alpha: Optional[float] = field(
        default=None, metadata={"help": "LoRA alpha; the adapters are scaled by alpha/rank. Default: the rank."}
    )
    prior_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the prior-preservation loss."})
    noise_offset: float = field(
        default=0.0, metadata={"help": "Offset noise scale (about 0.1 helps very dark/bright images); 0 is off."}
    )
    snr_gamma: Optional[float] = field(
        default=None, metadata={"help": "Min-SNR weighting gamma (5.0 is the paper's value); unset is off."}
    )
    prediction_type: Optional[str] = field(
        default=None,
        metadata={
            "help": "Training target: epsilon or v_prediction. Unset reads it from the model's scheduler config.",
            "choices": [None, "epsilon", "v_prediction"],
        },
    )
    lora_layers: Optional[str] = field(
        default=None,
        metadata={"help": "Where the denoiser's adapters go: attn (the default: to_q,to_k,to_v,to_out.0 of every "
                          "attention; SD3 also add_q_proj,add_k_proj,add_v_proj,to_add_out), attn_ff (plus the "
                          "feed-forward Linears ff.net.0.proj, ff.net.2; SD3 also ff_context), all_linear (every "
                          "Linear inside the transformer blocks), or comma-separated module names."},
    )
    text_encoder_lora_layers: Optional[str] = field(
        default=None,
        metadata={"help": "With --use_lora --train_text_encoder (SD, SDXL): attn (the default: q/k/v/out_proj of "
                          "each CLIP self-attention) or attn_mlp (plus mlp.fc1, mlp.fc2).",
                  "choices": [None, *TEXT_ENCODER_PRESETS]},
    )
    lora_block_ranks: Optional[str] = field(
        default=None,
        metadata={"help": "Per-block LoRA ranks of the denoiser: down=4,mid=8,up=2 (UNets; down.N/up.N for one "
                          "block) or 0-5=8,6-11=4 (SD3 joint blocks). Unlisted blocks: --lora_rank."},
    )
    lora_block_alphas: Optional[str] = field(
        default=None, metadata={"help": "Per-block LoRA alphas, as --lora_block_ranks. Unlisted blocks: --lora_alpha."}
    )
    lora_block_lr: Optional[str] = field(
        default=None,
        metadata={"help": "Per-block learning-rate multipliers of the adapters, as --lora_block_ranks (0 freezes "
                          "that block's adapters). Unlisted blocks: 1."},
    )
    # loss and noise variants (kohya's sd-scripts options; README "Loss and noise variants")
    loss_type: str = field(
        default="l2",
        metadata={"help": "Per-element loss: l2 (squared error, the default), huber (2c(sqrt(d^2+c^2)-c)) or "
                          "smooth_l1 (2(sqrt(d^2+c^2)-c)), with the threshold c from --huber_schedule.",
                  "choices": list(LOSS_TYPES)},
    )
    huber_schedule: str = field(
        default="snr",
        metadata={"help": "huber/smooth_l1 threshold per timestep: constant (--huber_c), exponential (1 at t=0 down "
                          "to --huber_c at the last step) or snr (default; (1-c)/(1+sigma_t)^2+c, SD/SDXL only).",
                  "choices": list(HUBER_SCHEDULES)},
    )
    huber_c: float = field(default=0.1, metadata={"help": "The Huber threshold parameter c (0.1)."})
    min_timestep: Optional[int] = field(
        default=None, metadata={"help": "Lowest training timestep (0..999; default 0). SD3: the lowest 1000*sigma."}
    )
    max_timestep: Optional[int] = field(
        default=None, metadata={"help": "Training timesteps stay below this (1..1000; default: all of them). SD3: "
                                        "the highest 1000*sigma (inclusive)."}
    )
    multires_noise_iterations: int = field(
        default=0, metadata={"help": "SD/SDXL: levels of multi-resolution (pyramid) noise added to the noise (6-10 "
                                     "is usual); 0 is off."}
    )
    multires_noise_discount: float = field(
        default=0.3, metadata={"help": "SD/SDXL: each pyramid level's weight is this to the power of its level (0.3)."}
    )
    adaptive_noise_scale: float = field(
        default=0.0, metadata={"help": "SD/SDXL, with --noise_offset: the offset strength becomes noise_offset + "
                                       "this * |the latents' channel mean| (floored at 0); 0 is off."}
    )
    ip_noise_gamma: float = field(
        default=0.0, metadata={"help": "SD/SDXL: input perturbation; the noisy input uses noise + gamma * another "
                                       "Gaussian, the target the plain noise (about 0.1); 0 is off."}
    )
    debiased_estimation_loss: bool = field(
        default=False, metadata={"help": "SD/SDXL: weight each sample's loss by 1/sqrt(SNR_t) (v-prediction: "
                                         "1/(SNR_t+1)), SNR capped at 1000."}
    )
    # flow matching (SD3) only
    weighting_scheme: Optional[str] = field(
        default=None,
        metadata={"help": "SD3: timestep density logit_normal (default), mode or uniform; or uniform timesteps with "
                          "loss weights sigma_sqrt, cosmap or none.", "choices": [None, *FLOW_WEIGHTING_SCHEMES]},
    )
    logit_mean: Optional[float] = field(default=None, metadata={"help": "SD3, logit_normal: mean (0.0)."})
    logit_std: Optional[float] = field(default=None, metadata={"help": "SD3, logit_normal: standard deviation (1.0)."})
    mode_scale: Optional[float] = field(default=None, metadata={"help": "SD3, mode: scale (1.29)."})
    precondition_outputs: Optional[int] = field(
        default=None,
        metadata={"help": "SD3: 1 (default) compares x0 = noisy - sigma * output with the latents; 0 compares the "
                          "output with the velocity noise - latents.", "choices": [None, 0, 1]},
    )
    max_sequence_length: int = field(default=77, metadata={"help": "SD3: T5 prompt length in tokens (77..512)."})
    drop_t5: bool = field(
        default=False, metadata={"help": "SD3: do not load T5; its prompt part is zeros, as the pipeline does without it."}
    )

    FLOW_ONLY = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "precondition_outputs")
    # options that act on the DDPM noise schedule (SD/SDXL); each is off when falsy (None, 0, False)
    DDPM_ONLY = ("prediction_type", "snr_gamma", "adaptive_noise_scale", "noise_offset", "multires_noise_iterations",
                 "ip_noise_gamma", "debiased_estimation_loss")

    def __post_init__(self):
        check_fields(self)
        if self.min_timestep is not None and self.max_timestep is not None and self.min_timestep >= self.max_timestep:
            raise ConfigError(f"--min_timestep {self.min_timestep} must be below --max_timestep {self.max_timestep} "
                              "(timesteps are drawn from [min, max)).")
        if self.adaptive_noise_scale and not self.noise_offset:
            raise ConfigError("--adaptive_noise_scale adjusts the offset noise's strength; it needs --noise_offset "
                              "(e.g. --noise_offset 0.1).")
        if self.lora_type != "lora" and not self.use_lora:
            raise ConfigError(f"--lora_type {self.lora_type} is a kind of LoRA adapter; it needs --use_lora (or "
                              "python -m ppdreambooth.train_lora).")
        if self.lokr_factor != -1 and self.lora_type != "lokr":
            raise ConfigError(f"--lokr_factor {self.lokr_factor} splits LoKr's Kronecker factors; it needs "
                              "--lora_type lokr.")
        if self.conv_rank is not None and self.lora_type == "dora":
            raise ConfigError("--conv_rank adapts the UNet's 3x3 convolutions with LoCon (--lora_type lora), LoHa or "
                              "LoKr; DoRA here adapts Linear layers only.")
        self.check_lora_targets()
        if self.conv_alpha is not None and self.conv_rank is None:
            raise ConfigError("--conv_alpha scales the --conv_rank adapters; give --conv_rank too.")
        if self.conv_rank is not None and self.conv_alpha is None:
            self.conv_alpha = float(self.conv_rank)
        if self.lora_alpha is None:
            self.lora_alpha = float(self.lora_rank)
        if self.train_text_encoder_ti and not re.fullmatch(r"[^\s<>]+", self.token_abstraction or ""):
            raise ConfigError(f"--token_abstraction {self.token_abstraction!r} must be one word (no spaces, no < or >), "
                              "the identifier of the instance prompt, e.g. sks.")
        if self.initializer_concept is not None and not self.train_text_encoder_ti:
            raise ConfigError("--initializer_concept sets where the new tokens of pivotal tuning start; it needs "
                              "--train_text_encoder_ti.")
        if self.initializer_concept is not None and not self.initializer_concept.strip():
            raise ConfigError("--initializer_concept is empty: give one or more words (e.g. the class word) or "
                              "leave it unset for random new tokens.")

    def check_lora_targets(self) -> None:
        """--lora_layers, --text_encoder_lora_layers and the --lora_block_* flags: syntax, values, and the LoRA
        settings they need (the family's block naming and count are checked once the model's config is read)."""
        from ppdreambooth.config.lora_blocks import BLOCK_FLAGS, parse_block_values

        for flag in BLOCK_FLAGS:
            if parse_block_values(flag, getattr(self, flag)) and not self.use_lora:
                raise ConfigError(f"--{flag} sets LoRA adapters per block; it needs --use_lora.")
        layers = self.lora_layers
        if layers is not None:
            names = [n.strip() for n in layers.split(",")]
            bad = [n for n in names if not re.fullmatch(r"[A-Za-z_][\w.]*", n)]
            near = difflib.get_close_matches(names[0], DENOISER_PRESETS, n=1, cutoff=0.75) if len(names) == 1 else []
            if (bad or near) and layers not in DENOISER_PRESETS:
                hint = f"did you mean {near[0]}? " if near else ""
                raise ConfigError(f"--lora_layers {layers!r}: {hint}give a preset ({', '.join(DENOISER_PRESETS)}) or "
                                  "comma-separated module names (e.g. to_q,to_v,ff.net.2).")
        if self.text_encoder_lora_layers not in (None, "attn") and not (self.use_lora and self.train_text_encoder):
            raise ConfigError(f"--text_encoder_lora_layers {self.text_encoder_lora_layers} chooses the text encoders' "
                              "LoRA targets; it needs --use_lora and --train_text_encoder.")


@dataclass
class DataArguments:
    instance_data_dir: Optional[str] = field(default=None, metadata={"help": "Folder of the subject's photos."})
    instance_prompt: Optional[str] = field(
        default=None, metadata={"help": "Prompt with the identifier, e.g. 'a photo of sks dog'."}
    )
    class_data_dir: Optional[str] = field(
        default=None, metadata={"help": "Folder of class images (generated there when too few)."}
    )
    class_prompt: Optional[str] = field(default=None, metadata={"help": "Prompt of the class, e.g. 'a photo of dog'."})
    with_prior_preservation: bool = field(default=False, metadata={"help": "Add the prior-preservation loss."})
    prior_preservation_mode: str = field(
        default="class_images",
        metadata={"help": "class_images (the paper's: generated class images, the default) or base_prediction "
                          "(LoRA only: the base model's own prediction for the instance latents under the class "
                          "prompt is the prior target; no class images).",
                  "choices": ["class_images", "base_prediction"]},
    )
    num_class_images: int = field(
        default=100, metadata={"help": "Class images wanted; missing ones are generated with the base model."}
    )
    sample_batch_size: int = field(default=4, metadata={"help": "Batch size for generating class images."})
    class_image_inference_steps: int = field(
        default=25, metadata={"help": "DPM-Solver steps per generated class image."}
    )
    resolution: int = field(default=512, metadata={"help": "Training image size, used where height/width are unset."})
    height: Optional[int] = field(default=None, metadata={"help": "Training image height (default: resolution)."})
    width: Optional[int] = field(default=None, metadata={"help": "Training image width (default: resolution)."})
    center_crop: bool = field(default=False, metadata={"help": "Crop the centre after resizing (else a random crop)."})
    random_flip: bool = field(default=False, metadata={"help": "Flip images horizontally at random."})
    cache_latents: bool = field(
        default=False,
        metadata={"help": "Require every image to be encoded once before training (needs --center_crop). Without "
                          "it, images whose crop is determined are cached anyway and the rest encoded each step."},
    )
    no_cache_latents: bool = field(
        default=False, metadata={"help": "Encode every image with the VAE at every step (no latent caching)."}
    )
    concepts: Optional[str] = field(
        default=None,
        metadata={"help": "Several subjects: a JSON list (or .json file) of objects with instance_data_dir, "
                          "instance_prompt and optionally class_data_dir, class_prompt, num_class_images, repeats."},
    )
    caption_extension: str = field(
        default=".txt", metadata={"help": "A file beside an image with this extension is its caption."}
    )
    caption_dropout_rate: float = field(
        default=0.0, metadata={"help": "Train an instance photo on the empty prompt instead of its caption with this "
                                       "probability (0-1; class images never). The empty prompt is cached too."}
    )
    shuffle_caption: bool = field(
        default=False, metadata={"help": "Shuffle the comma-separated tags of instance captions at each step; the "
                                         "instance prompt stays whole and first. Prompts are then encoded each step."}
    )
    keep_tokens: int = field(
        default=0, metadata={"help": "With --shuffle_caption / --caption_tag_dropout_rate: the first N tags stay in "
                                     "place and are never dropped (the instance prompt counts as one)."}
    )
    caption_tag_dropout_rate: float = field(
        default=0.0, metadata={"help": "Drop each tag of an instance caption with this probability (0-1), never the "
                                       "instance prompt nor the --keep_tokens tags. Prompts are then encoded each "
                                       "step."}
    )
    masked_loss: bool = field(
        default=False, metadata={"help": "Weight the loss of instance photos by a mask (white counts, black does "
                                         "not), from --instance_mask_dir or --alpha_mask; class images unmasked."}
    )
    instance_mask_dir: Optional[str] = field(
        default=None, metadata={"help": "With --masked_loss: a folder with one greyscale mask per instance photo, "
                                        "named after it (dog1.jpg -> dog1.png), the photo's size."}
    )
    alpha_mask: bool = field(
        default=False, metadata={"help": "With --masked_loss: the photos' alpha channel is the mask (transparent "
                                         "parts do not count)."}
    )
    masked_loss_unmasked_weight: float = field(
        default=0.0, metadata={"help": "With --masked_loss: the weight (0-1) the area outside the mask keeps; 0 "
                                       "ignores it, 1 is no mask."}
    )
    masked_loss_normalize: bool = field(
        default=False, metadata={"help": "With --masked_loss: divide each photo's loss by its mask's mean weight, "
                                         "so a small subject trains as strongly as a large one."}
    )
    enable_bucket: bool = field(
        default=False, metadata={"help": "Keep aspect ratios: batch images by the size bucket nearest their shape."}
    )
    min_bucket_reso: int = field(default=256, metadata={"help": "Smallest bucket side."})
    max_bucket_reso: int = field(default=1024, metadata={"help": "Largest bucket side."})
    bucket_reso_steps: int = field(default=64, metadata={"help": "Bucket sides are multiples of this."})

    def __post_init__(self):
        for name in ("resolution", "height", "width"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % 8 != 0):
                raise ConfigError(
                    f"--{name} must be a positive multiple of 8 (the VAE downsamples by 8), got {value}."
                )
        check_fields(self)
        if self.cache_latents and self.no_cache_latents:
            raise ConfigError("--cache_latents and --no_cache_latents contradict each other; give one.")
        if self.cache_latents and not (self.center_crop or self.enable_bucket):
            raise ConfigError(
                "--cache_latents cannot reproduce random crops (one cached latent per image); add --center_crop."
            )
        self.check_masked_loss()
        if self.enable_bucket:
            step = self.bucket_reso_steps
            if step <= 0 or step % 8 or self.min_bucket_reso % step or self.max_bucket_reso % step:
                raise ConfigError("--bucket_reso_steps must be a multiple of 8 that divides --min_bucket_reso "
                                  "and --max_bucket_reso.")
            if not 0 < self.min_bucket_reso <= self.resolution <= self.max_bucket_reso:
                raise ConfigError("buckets need --min_bucket_reso <= --resolution <= --max_bucket_reso.")

    def check_masked_loss(self) -> None:
        """--masked_loss needs exactly one mask source, and the mask options need --masked_loss."""
        if self.masked_loss:
            if self.alpha_mask and self.instance_mask_dir:
                raise ConfigError("--masked_loss takes its masks from --instance_mask_dir or from --alpha_mask, not "
                                  "both; drop one.")
            if not (self.alpha_mask or self.instance_mask_dir or self.concepts):
                raise ConfigError("--masked_loss needs masks: --instance_mask_dir <folder of <photo stem>.png masks> "
                                  "or --alpha_mask (the photos' transparency).")
            return
        given = [name for name in ("instance_mask_dir", "alpha_mask", "masked_loss_unmasked_weight",
                                   "masked_loss_normalize") if getattr(self, name)]
        if given:
            raise ConfigError(f"--{given[0]} only acts with --masked_loss; add --masked_loss (or drop it).")

    concept_list = ()  # every subject of the run (`config.concepts.resolve_concepts`), set by `parse_args`

    @property
    def image_size(self) -> tuple:
        """(height, width) of training images."""
        return (self.height or self.resolution, self.width or self.resolution)


@dataclass
class DreamBoothTrainingArguments(TrainingArguments):
    """PaddleNLP TrainingArguments with the defaults of ppdiffusers' `train_dreambooth.py`."""

    output_dir: str = field(default="dreambooth-model", metadata={"help": "Where checkpoints and the model go."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Batch size per device."})
    learning_rate: float = field(default=5e-6, metadata={"help": "Initial learning rate (after warmup)."})
    lr_scheduler_type: str = field(
        default="constant",
        metadata={
            "help": "Learning-rate schedule.",
            "choices": LR_SCHEDULERS,
        },
    )
    warmup_steps: int = field(
        default=500, metadata={"help": "Linear warmup steps (the constant schedule has none)."}
    )
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "Clip gradients to this global norm, as the seed script does (1.0); <= 0 disables clipping."},
    )
    decay_bias_and_norm: bool = field(
        default=True,
        metadata={"help": "Apply --weight_decay to biases and normalisation weights too, as the seed script's AdamW "
                          "does (default). false exempts them (the transformers/diffusers convention)."},
    )
    optim: str = field(
        default="adamw",
        metadata={"help": "Optimizer: adamw (default), adafactor (factored second moments: less memory), prodigy "
                          "(Adam with an estimated step size; its --learning_rate, 1.0 by default, scales that) or "
                          "adamw_schedulefree (schedule-free AdamW: constant rate after --lr_warmup_steps, the saved "
                          "weights are its running average; --lr_scheduler constant or constant_with_warmup) or adamw_8bit "
                          "(AdamW with its two moments stored as 8-bit block-wise codes: ~2 instead of 8 bytes per "
                          "trained weight).",
                  "choices": list(OPTIMIZERS)},
    )
    prodigy_d_coef: float = field(
        default=1.0, metadata={"help": "--optim prodigy: multiply its step-size estimate (0.5-2 are typical)."}
    )
    prodigy_safeguard_warmup: bool = field(
        default=False, metadata={"help": "--optim prodigy: keep the learning rate (a warmup) out of the estimate."}
    )
    prodigy_use_bias_correction: bool = field(
        default=False, metadata={"help": "--optim prodigy: Adam's bias correction of the moments (off by default)."}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs to train (max_train_steps wins)."})
    logging_dir: Optional[str] = field(
        default="logs", metadata={"help": "VisualDL/TensorBoard log folder; a relative path is inside output_dir."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log the losses every N steps."})
    report_to: Optional[List[str]] = field(
        default_factory=lambda: ["visualdl"],
        metadata={"help": "Loggers: visualdl (default), tensorboard (needs tensorboardX), or none."},
    )
    scale_lr: bool = field(
        default=False,
        metadata={"help": "Multiply the learning rate by accumulation steps x batch size x number of processes."},
    )
    enable_xformers_memory_efficient_attention: bool = field(
        default=False, metadata={"help": "Use Paddle's memory-efficient attention (GPU builds only)."}
    )
    validation_prompt: Optional[str] = field(
        default=None, metadata={"help": "Prompt for validation images during training (off when unset)."}
    )
    num_validation_images: int = field(default=4, metadata={"help": "Validation images per validation run."})
    validation_epochs: Optional[int] = field(
        default=None, metadata={"help": "Generate validation images every N epochs (the LoRA script uses 50)."}
    )
    validation_steps: Optional[int] = field(
        default=None, metadata={"help": "Generate validation images every N optimizer steps."}
    )
    validation_inference_steps: int = field(default=25, metadata={"help": "DPM-Solver steps per validation image."})
    text_encoder_learning_rate: Optional[float] = field(
        default=None, metadata={"help": "Learning rate of a trained text encoder (default: --learning_rate)."}
    )
    stop_text_encoder_training: Optional[int] = field(
        default=None, metadata={"help": "Freeze a trained text encoder from this optimizer step on."}
    )
    use_ema: bool = field(default=False, metadata={"help": "Keep an EMA of the trained weights; it is the output."})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay (warmed up as min(decay, (1+n)/(10+n)))."})
    evaluate_every_n_checkpoints: Optional[int] = field(
        default=None, metadata={"help": "Every K-th checkpoint, score DINO / CLIP-I / CLIP-T on a few DreamBench prompts "
                                        "(VisualDL, fidelity.json, fidelity.png)."}
    )
    evaluate_at_end: bool = field(default=False, metadata={"help": "Score the fidelity metrics when training ends."})
    eval_world: bool = field(
        default=False, metadata={"help": "Score the toy world's exact personalisation metrics (subject and prompt "
                                         "fidelity, language drift, background leakage) instead of DINO/CLIP."}
    )
    eval_class_name: Optional[str] = field(
        default=None, metadata={"help": "The subject's class for the evaluation prompts (default: the instance "
                                        "prompt's last word)."}
    )
    eval_prompts_file: Optional[str] = field(
        default=None, metadata={"help": "Evaluation prompts, one a line ('{}' = identifier and class); default: "
                                        "DreamBench's."}
    )
    eval_num_prompts: int = field(default=4, metadata={"help": "Evaluation prompts used, spread over the set."})
    eval_images_per_prompt: int = field(default=2, metadata={"help": "Evaluation images per prompt."})
    eval_clip_model: str = field(
        default="openai/clip-vit-base-patch32", metadata={"help": "CLIP for CLIP-I/CLIP-T: hub id or local folder."}
    )
    eval_dino_model: str = field(
        default="facebook/dino-vits16", metadata={"help": "DINO ViT-S/16 for DINO: hub id or local folder."}
    )
    log_level: str = field(
        default="passive",
        metadata={"help": "Console detail: passive (default: a header, progress, losses, checkpoints, warnings; "
                          "everything else goes to <output_dir>/train.log), or debug/info (all of it on the console).",
                  "choices": ["passive", "debug", "info", "warning"]},
    )
    not_validation_final: bool = field(
        default=False, metadata={"help": "Skip the validation images at the end of training (PaddleMIX's SD3 flag)."}
    )
    export_formats: Optional[str] = field(
        default=None, metadata={"help": "Also export at the end: comma-separated diffusers, single-file (full), kohya and/or "
                                        "merged (LoRA)."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final model to the Hugging Face hub."})
    hub_token: Optional[str] = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "Hub repository (default: output_dir's name)."})

    def check_optim(self) -> str:
        """--optim's name, refused when unknown; the --prodigy_* options need --optim prodigy, which cannot run with
        --sharding (each rank would estimate its own step size from its share of the weights)."""
        optim = str(getattr(self.optim, "value", self.optim))
        if optim not in OPTIMIZERS:
            raise ConfigError(f"--optim {optim!r} is not supported; use {', '.join(OPTIMIZERS)}.")
        if optim == "adamw_schedulefree":
            self.check_schedule_free()
        if optim == "adamw_8bit" and self.sharding and self.sharding not in ("", "none", ["none"]):
            raise ConfigError("--optim adamw_8bit does not run with --sharding (the sharding wrappers need Paddle's own "
                              "optimizers and split their float32 moments). Use plain data parallelism (no "
                              "--sharding), or --optim adamw with --sharding.")
        if optim != "prodigy":
            given = [name for name, value in (("prodigy_d_coef", self.prodigy_d_coef != 1.0),
                                              ("prodigy_safeguard_warmup", self.prodigy_safeguard_warmup),
                                              ("prodigy_use_bias_correction", self.prodigy_use_bias_correction))
                     if value]
            if given:
                raise ConfigError(f"--{given[0]} only acts with --optim prodigy; add --optim prodigy (or drop it).")
            return optim
        if self.sharding and self.sharding not in ("", "none", ["none"]):
            raise ConfigError("--optim prodigy does not run with --sharding: its step size is estimated from sums over "
                              "all weights, and each rank would hold only a share of them. Use plain data "
                              "parallelism (no --sharding), or --optim adamw.")
        if self.learning_rate < 0.1:
            logger.warning("--optim prodigy with --learning_rate %g: the rate multiplies Prodigy's estimated step size "
                           "(1.0 is the usual value); a small rate makes the training crawl.", self.learning_rate)
        return optim

    def check_schedule_free(self) -> None:
        """--optim adamw_schedulefree: a rate that is constant after the warmup (the average replaces the decay),
        no second average (--use_ema), no --sharding, and beta1 > 0 (x is recovered from y and z through it)."""
        scheduler = str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type))
        if scheduler not in SCHEDULE_FREE_SCHEDULERS:
            raise ConfigError(f"--lr_scheduler {scheduler} (--lr_scheduler_type) does not go with --optim "
                              "adamw_schedulefree: schedule-free AdamW keeps the rate constant after its warmup and "
                              "averages the weights instead of decaying the rate. Use --lr_scheduler constant, or "
                              "constant_with_warmup with --lr_warmup_steps N.")
        if self.use_ema:
            raise ConfigError("--use_ema does not go with --optim adamw_schedulefree: the weights it saves are "
                              "already an average of the iterates (its x). Drop --use_ema, or use --optim adamw.")
        if self.sharding and self.sharding not in ("", "none", ["none"]):
            raise ConfigError("--optim adamw_schedulefree does not run with --sharding (the sharding wrappers need "
                              "Paddle's own optimizers). Use plain data parallelism (no --sharding), or --optim "
                              "adamw.")
        if not self.adam_beta1 > 0:
            raise ConfigError(f"--adam_beta1 {self.adam_beta1:g} does not go with --optim adamw_schedulefree: beta1 "
                              "is its interpolation between the average and the base sequence and must be > 0 "
                              "(0.9 is the usual value).")

    @property
    def export_format_list(self) -> List[str]:
        """--export_formats as a list (empty when unset)."""
        return [f for f in (self.export_formats or "").split(",") if f]

    def __post_init__(self):
        if self.logging_dir and not os.path.isabs(self.logging_dir):
            self.logging_dir = os.path.join(self.output_dir, self.logging_dir)
        if self.report_to in (None, "none", ["none"]):
            self.report_to = []
        unknown = [r for r in self.report_to if r not in ("visualdl", "tensorboard", "wandb")]
        if unknown:
            raise ConfigError(f"--report_to {unknown[0]!r} is not supported; use visualdl, tensorboard, wandb or none.")
        check_fields(self)
        unknown = [f for f in self.export_format_list if f not in EXPORT_FORMATS]
        if unknown:
            raise ConfigError(f"--export_formats: unknown format {unknown[0]!r}; use diffusers, single-file, kohya, "
                              "merged.")
        if self.fp16 and self.bf16:
            raise ConfigError("--fp16 and --bf16 are exclusive; choose one.")
        optim = self.check_optim()
        console_level = self.log_level
        if optim in OWN_OPTIMIZERS:
            self.optim = "adamw"  # PaddleNLP's __post_init__ makes --optim an OptimizerNames, which has neither
        super().__post_init__()
        if optim in OWN_OPTIMIZERS:
            self.optim = optim  # a plain string: the Trainer builds ppdreambooth's own optimizer for it
        self.log_level = console_level  # PaddleNLP 2.8 overwrites the name with -1 and never reads it again
        if self.scale_lr:
            self.learning_rate *= self.gradient_accumulation_steps * self.per_device_train_batch_size * self.world_size


@dataclass
class SeedFlagAliases:
    """Flags of the seed's `train_dreambooth.py` that PaddleNLP's Trainer spells differently.

    Each one is the same setting as the Trainer field it names; giving both with different values is an
    error. They exist so that the seed's command lines run unchanged.
    """

    train_batch_size: Optional[int] = field(default=None, metadata={"help": "= --per_device_train_batch_size."})
    max_train_steps: Optional[int] = field(default=None, metadata={"help": "= --max_steps (wins over epochs)."})
    checkpointing_steps: Optional[int] = field(default=None, metadata={"help": "= --save_steps."})
    checkpoints_total_limit: Optional[int] = field(default=None, metadata={"help": "= --save_total_limit."})
    lr_scheduler: Optional[str] = field(
        default=None, metadata={"help": "= --lr_scheduler_type.", "choices": LR_SCHEDULERS}
    )
    lr_warmup_steps: Optional[int] = field(default=None, metadata={"help": "= --warmup_steps."})
    adam_weight_decay: Optional[float] = field(default=None, metadata={"help": "= --weight_decay."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "= --recompute."})
    rank: Optional[int] = field(default=None, metadata={"help": "= --lora_rank (the LoRA script's name)."})
    text_encoder_lr: Optional[float] = field(
        default=None, metadata={"help": "= --text_encoder_learning_rate (the SDXL LoRA script's name)."}
    )
    mixed_precision: Optional[str] = field(
        default=None, metadata={"help": "no | fp16 | bf16 (= --fp16 / --bf16).", "choices": ["no", "fp16", "bf16"]}
    )


# seed flag -> TrainingArguments field
ALIAS_TARGETS = {
    "train_batch_size": "per_device_train_batch_size",
    "max_train_steps": "max_steps",
    "checkpointing_steps": "save_steps",
    "checkpoints_total_limit": "save_total_limit",
    "lr_scheduler": "lr_scheduler_type",
    "lr_warmup_steps": "warmup_steps",
    "adam_weight_decay": "weight_decay",
    "gradient_checkpointing": "recompute",
    "rank": "lora_rank",
    "text_encoder_lr": "text_encoder_learning_rate",
}
