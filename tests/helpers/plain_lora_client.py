"""Load a LoRA file as a user without ppdreambooth would, and write the denoiser's outputs.

    python plain_lora_client.py <plain|peft> <base model> <lora dir> <load_lora_weights|load_attn_procs|none> \
        <inputs.npz> <outputs.npz>

Never imports ppdreambooth. `plain` is a fresh ppdiffusers session as installed; `peft` switches on
ppdiffusers' peft backend the way its documentation says (USE_PEFT_BACKEND=True before import), plus the
`ParameterDict` accessors Paddle 3 dropped, which that backend needs. The pipeline class is read from the
model's model_index.json. Inputs: latents, timesteps, input_ids (and for SDXL input_ids_2, time_ids);
outputs: the UNet prediction and the first text encoder's hidden states.
"""
import json
import os
import sys


def main(mode, base, lora, how, inputs, outputs):
    if mode == "peft":
        os.environ["USE_PEFT_BACKEND"] = "True"
    else:  # as installed: whatever the parent process set (ppdreambooth sets this) does not count
        os.environ.pop("USE_PEFT_BACKEND", None)
    import numpy as np
    import paddle

    if mode == "peft":
        cls = paddle.nn.ParameterDict
        if not hasattr(cls, "keys"):
            cls.keys = lambda self: self._parameters.keys()
            cls.items = lambda self: self._parameters.items()
            cls.values = lambda self: self._parameters.values()
        if "__contains__" not in vars(cls):
            cls.__contains__ = lambda self, key: key in self._parameters
    import ppdiffusers

    with open(os.path.join(base, "model_index.json")) as f:
        pipeline_class = getattr(ppdiffusers, json.load(f)["_class_name"])
    pipe = pipeline_class.from_pretrained(base)
    if how == "load_lora_weights":
        pipe.load_lora_weights(lora)
    elif how == "load_attn_procs":  # the seed README's way
        pipe.unet.load_attn_procs(lora, weight_name="paddle_lora_weights.safetensors")
    # "none": a merged folder, the adapters are in its weights already
    data = {k: paddle.to_tensor(v) for k, v in np.load(inputs).items()}
    with paddle.no_grad():
        first = pipe.text_encoder(data["input_ids"], output_hidden_states=True)
        if "time_ids" in data:  # SDXL
            second = pipe.text_encoder_2(data["input_ids_2"], output_hidden_states=True)
            hidden = paddle.concat([first.hidden_states[-2], second.hidden_states[-2]], axis=-1)
            added = {"text_embeds": second.text_embeds, "time_ids": data["time_ids"]}
            pred = pipe.unet(data["latents"], data["timesteps"], hidden, added_cond_kwargs=added).sample
        else:
            hidden = first[0]
            pred = pipe.unet(data["latents"], data["timesteps"], hidden).sample
    np.savez(outputs, pred=pred.numpy(), hidden=first[0].numpy())


if __name__ == "__main__":
    main(*sys.argv[1:7])
