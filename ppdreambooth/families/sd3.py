"""Stable Diffusion 3: an MMDiT transformer trained by flow matching, conditioned on CLIP-L, CLIP-G and T5.

As ppdiffusers' `StableDiffusion3Pipeline.encode_prompt` conditions it:
- each CLIP gives its penultimate hidden state and its projected pooled output; the two hidden states are
  concatenated on channels and zero-padded to the T5 width (the transformer's `joint_attention_dim`);
- T5's last hidden state follows along the sequence; without T5 (a folder without `text_encoder_3`, or
  `--drop_t5`) zeros stand in for it, as the pipeline does;
- the pooled embedding is both CLIP projections concatenated.
The transformer takes `timestep = sigma * 1000`. Two quirks of ppdiffusers 0.29 are handled here: its own
gradient checkpointing is broken (each joint block is recomputed instead), and in the last block, which
keeps no context stream, the context query projection only ever gets a zero gradient (it is frozen).
"""
from __future__ import annotations

from typing import Dict

from ppdreambooth.batch import POOLED_PROMPT_EMBEDS, PROMPT_EMBEDS, token_key
from ppdreambooth.families.base import ModelFamily


class StableDiffusion3(ModelFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser = "transformer"
    denoiser_class = "SD3Transformer2DModel"
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    text_encoder_classes = {"text_encoder": "CLIPTextModelWithProjection",
                            "text_encoder_2": "CLIPTextModelWithProjection", "text_encoder_3": "T5EncoderModel"}
    tokenizer_classes = {"tokenizer_3": "T5Tokenizer"}
    optional_components = ("text_encoder_3", "tokenizer_3")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")  # T5 (4.7B in SD3-medium) stays frozen
    objective = "flow"
    training_scheduler = "FlowMatchEulerDiscreteScheduler"
    sampling_scheduler = "FlowMatchEulerDiscreteScheduler"
    lora_scale_kwarg = "joint_attention_kwargs"
    resolution_multiple = 16  # the VAE's 8 x the transformer's patch size 2
    denoiser_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                             "to_add_out")
    text_encoder_lora_targets = ()  # ppdiffusers' SD3 LoRA loader reads transformer adapters only
    text_encoder_mlp_targets = ()
    denoiser_ff_targets = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
    denoiser_block_pattern = r"transformer_blocks\.\d+\."
    lora_blocks_numbered = True
    legacy_lora_keys = False  # its loader requires the peft backend and peft names
    card_tag = "stable-diffusion-3"
    # pivotal tuning: the two CLIP encoders only (T5 reads the token strings as plain text)
    textual_inversion_keys = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    textual_inversion_loader = False
    unsupported_options = {
        "conv_rank": "SD3's transformer has no 3x3 convolutions to adapt: its only convolution is the 2x2 patch "
                     "embedding (pos_embed.proj), outside what LyCORIS's conv adapters cover; drop --conv_rank "
                     "(the attention projections carry the adapters).",
        "lora_text_encoder": "SD3 LoRA trains the transformer only: ppdiffusers 0.29 saves and loads SD3 adapters "
                             "for the transformer alone. Drop --train_text_encoder, or train the CLIP encoders "
                             "fully without --use_lora.",
        "ddpm_options": "is a DDPM option; SD3 trains by flow matching, which has no DDPM noise schedule (its "
                        "epsilon/v targets, SNR, offset or pyramid noise, perturbed inputs) for it to act on. Use "
                        "--weighting_scheme (logit_normal, mode, uniform, sigma_sqrt, cosmap, none) and "
                        "--precondition_outputs instead; --loss_type and --min_timestep/--max_timestep work for SD3 "
                        "too.",
        "huber_schedule_snr": "the snr schedule takes the threshold from the DDPM schedule's signal-to-noise ratio, "
                              "which SD3's flow matching does not have. Add --huber_schedule constant or "
                              "exponential.",
        # The two exports SD3 does not write, read by the training entry (--export_formats) and by export.py.
        "export_kohya": "SD3 LoRAs have no kohya export. Use --format diffusers: its "
                        "transformer.<module>.lora_A/lora_B.weight file is what diffusers' "
                        "StableDiffusion3Pipeline.load_lora_weights reads, and ComfyUI loads that same file as an "
                        "SD3 LoRA (comfy/lora.py maps the diffusers SD3 keys onto its MMDiT weights).",
        "export_single-file": "writing an SD3 single-file checkpoint is not implemented. Use --format diffusers "
                              "for a diffusers pipeline folder (StableDiffusion3Pipeline.from_pretrained).",
    }

    def encode_prompt(self, text_encoders: Dict[str, object], tokens: Dict[str, object],
                      denoiser_config=None) -> Dict[str, object]:
        import paddle

        states, pooled = [], []
        for n, name in enumerate(self.text_encoders[:2]):
            output = text_encoders[name](tokens[token_key(n)], output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled.append(output[0])
        clip = paddle.concat(states, axis=-1)
        t5_encoder = text_encoders.get("text_encoder_3")
        if t5_encoder is not None:
            t5 = t5_encoder(tokens[token_key(2)])[0].astype(clip.dtype)
        else:
            width = denoiser_config["joint_attention_dim"]
            t5 = paddle.zeros([clip.shape[0], clip.shape[1], width], dtype=clip.dtype)
        clip = paddle.nn.functional.pad(clip, [0, t5.shape[-1] - clip.shape[-1]], data_format="NCL")
        return {PROMPT_EMBEDS: paddle.concat([clip, t5], axis=-2), POOLED_PROMPT_EMBEDS: paddle.concat(pooled, -1)}

    def predict(self, denoiser, noisy_latents, timesteps, conditioning: Dict[str, object]):
        return denoiser(hidden_states=noisy_latents, timestep=timesteps, encoder_hidden_states=conditioning[PROMPT_EMBEDS],
                        pooled_projections=conditioning[POOLED_PROMPT_EMBEDS]).sample

    def enable_recompute(self, denoiser) -> None:
        """Recompute each joint block in the backward pass (ppdiffusers 0.29's switch assigns the block's tuple
        output to one tensor and fails)."""
        from paddle.distributed.fleet.utils import recompute

        for block in denoiser.transformer_blocks:
            forward = block.forward

            def recomputed(hidden_states, encoder_hidden_states, temb, _forward=forward):
                return recompute(_forward, hidden_states, encoder_hidden_states, temb, use_reentrant=False)

            block.forward = recomputed

    def freeze_unused(self, denoiser) -> None:
        last = denoiser.transformer_blocks[-1]
        if getattr(last, "context_pre_only", False):
            # The last block discards its context output, so its context queries (add_q_proj) always get a
            # zero gradient: freezing them changes nothing the model computes, and spares their optimizer
            # state and a weight decay that would only shrink them.
            for param in last.attn.add_q_proj.parameters():
                param.stop_gradient = True
