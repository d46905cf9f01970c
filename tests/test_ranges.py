"""Every numeric flag has its valid range in one table (`ppdreambooth.config.ranges`), and the parser given any
value for any numeric flag either accepts a value inside that range or refuses it with a ConfigError naming the
flag (exit status 2) — never a traceback."""
import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppdreambooth.config.arguments import ALIAS_TARGETS
from ppdreambooth.config.parsing import ARGUMENT_CLASSES, parse_args
from ppdreambooth.config.ranges import RANGES
from ppdreambooth.errors import ConfigError

REQUIRED = ["--pretrained_model_name_or_path", "org/model", "--instance_data_dir", "photos",
            "--instance_prompt", "a photo of sks dog", "--output_dir", "out"]


def numeric_flags():
    """Every flag whose value is a number, from the argument dataclasses themselves."""
    flags = []
    for cls in ARGUMENT_CLASSES:
        for field in dataclasses.fields(cls):
            text = str(field.type)
            if field.init and ("int" in text or "float" in text) and "bool" not in text and "str" not in text:
                flags.append(field.name)
    return sorted(set(flags))


FLAGS = numeric_flags()
NASTY = ["0", "-1", "nan", "inf", "-inf", "1e30", str(10**30), "ten", "", "1.5", "2147483648", "-0"]


def outcome(flag, text):
    """0 when the parser accepts `--flag text` (checking the value it kept is in range), 2 when it refuses it
    with a ConfigError that names the flag; anything else raises."""
    try:
        model_args, data_args, args = parse_args(REQUIRED + [f"--{flag}", text])
    except ConfigError as e:
        assert flag in str(e) or ALIAS_TARGETS.get(flag, "-") in str(e), str(e)
        return 2
    target = ALIAS_TARGETS.get(flag, flag)
    kept = next(getattr(a, target) for a in (model_args, data_args, args) if hasattr(a, target))
    assert RANGES[target].accepts(kept) or (target == "learning_rate" and kept > 0), (flag, text, kept)
    return 0


def test_the_table_covers_every_numeric_flag():
    missing = [flag for flag in FLAGS if flag not in RANGES]
    assert not missing, f"numeric flags without a range in ppdreambooth/config/ranges.py: {missing}"
    assert len(FLAGS) > 60


@pytest.mark.parametrize("flag", FLAGS)
def test_bad_values_are_refused_naming_the_flag(flag):
    for text in NASTY:
        outcome(flag, text)
    for text in ("nan", "inf", "-inf", str(10**30), "ten"):
        assert outcome(flag, text) == 2, (flag, text)


def test_the_seed_readme_failures_are_refused():
    for flag, value in (("train_batch_size", "0"), ("learning_rate", "-1"), ("max_train_steps", "0"),
                        ("gradient_accumulation_steps", "0"), ("adam_beta2", "1"), ("lr_warmup_steps", "-5")):
        with pytest.raises(ConfigError, match=f"--{flag} .* is out of range: it must be"):
            parse_args(REQUIRED + [f"--{flag}", value])


def numbers():
    return st.one_of(st.integers(min_value=-(10**40), max_value=10**40),
                     st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from(NASTY),
                     st.text(min_size=0, max_size=6))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flag=st.sampled_from(FLAGS), value=numbers())
def test_any_value_of_any_numeric_flag_is_accepted_in_range_or_refused(flag, value):
    text = value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)
    status = outcome(flag, text)
    if status == 0:
        number = float(text)
        assert math.isfinite(number)


def test_a_range_describes_itself():
    assert RANGES["lora_rank"].describe() == "an integer >= 1 and <= 4,096"
    assert RANGES["max_steps"].describe() == ("an integer >= 1 and <= 1,000,000,000 (or -1: train --num_train_epochs "
                                              "epochs instead)")
    assert RANGES["learning_rate"].describe() == "a number > 0 and <= 10"
    assert not RANGES["ema_decay"].accepts(1.0) and RANGES["ema_decay"].accepts(0.999)
    assert not RANGES["seed"].accepts(True) and not RANGES["adam_epsilon"].accepts(float("nan"))
