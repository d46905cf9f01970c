"""Make the pinned stack (paddlepaddle 3.3.1 + ppdiffusers 0.29.0) work together for LoRA.

Imported by `ppdreambooth/__init__.py`, before anything imports ppdiffusers:

- ppdiffusers 0.29.0 supports LoRA training and loading only through its peft backend (the legacy
  attention-processor LoRA and the text-encoder monkey patch raise deprecation errors), and reads the
  switch once, at import: `USE_PEFT_BACKEND=True` is set here unless the user set it.
- ppdiffusers' peft LoRA layers call `ParameterDict.keys()`, which Paddle 3.x's `ParameterDict` no
  longer has; the dict-style accessors are added back, reading the layer's own `_parameters`.
- SD3's attention calls `paddle.nn.functional.scaled_dot_product_attention_`, which ppdiffusers defines
  only when its CUDA probe succeeds; on other builds (CPU) it is missing and every SD3 forward fails.
  There, and only there, Paddle's own `scaled_dot_product_attention` (same [batch, seq, heads, dim]
  layout, same result) stands in for it.
"""
import os

os.environ.setdefault("USE_PEFT_BACKEND", "True")


def _restore_parameter_dict_accessors() -> None:
    import paddle

    cls = paddle.nn.ParameterDict
    if not hasattr(cls, "keys"):
        cls.keys = lambda self: self._parameters.keys()
        cls.items = lambda self: self._parameters.items()
        cls.values = lambda self: self._parameters.values()
    if "__contains__" not in vars(cls):
        cls.__contains__ = lambda self, key: key in self._parameters


def _attention_fallback() -> None:
    import paddle.nn.functional as F

    if hasattr(F, "scaled_dot_product_attention_"):
        return

    def scaled_dot_product_attention_(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                      training=True, attention_op=None):
        if scale is not None:  # Paddle's kernel scales by 1/sqrt(head width); fold any other scale into the query
            query = query * (scale * query.shape[-1] ** 0.5)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, training=training)

    F.scaled_dot_product_attention_ = scaled_dot_product_attention_


_restore_parameter_dict_accessors()
_attention_fallback()
