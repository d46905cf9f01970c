"""Make the pinned stack (paddlepaddle 3.3.1 + ppdiffusers 0.29.0) work together for LoRA.

Imported by `ppdreambooth/__init__.py`, before anything imports ppdiffusers:

- ppdiffusers 0.29.0 supports LoRA training and loading only through its peft backend (the legacy
  attention-processor LoRA and the text-encoder monkey patch raise deprecation errors), and reads the
  switch once, at import: `USE_PEFT_BACKEND=True` is set here unless the user set it.
- ppdiffusers' peft LoRA layers call `ParameterDict.keys()`, which Paddle 3.x's `ParameterDict` no
  longer has; the dict-style accessors are added back, reading the layer's own `_parameters`.
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


_restore_parameter_dict_accessors()
