"""Options parsing: unknown keys are refused with the closest known name, never ignored."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from coldswarm.common.options import build, refuse_unknown, split_known, unknown_keys_message


@dataclass
class Knobs:
    steps: int = 1
    lr: float = 0.1
    batch_size: int = 8


class KnobError(ValueError):
    pass


def test_a_typo_is_refused_with_did_you_mean_and_the_known_list():
    with pytest.raises(KnobError) as info:
        build(Knobs, {"stpes": 3}, "knob(s)", KnobError)
    assert (
        str(info.value)
        == "unknown knob(s) ['stpes'] (did you mean 'steps'?); known: ['batch_size', 'lr', 'steps']"
    )


def test_several_unknown_keys_each_get_their_hint_and_a_stranger_gets_none():
    message = unknown_keys_message({"stpes", "batch_sise", "zzz"}, {"steps", "batch_size"}, "knob(s)")
    assert message.startswith("unknown knob(s) ['batch_sise', 'stpes', 'zzz'] (did you mean ")
    assert "'batch_size' for 'batch_sise'" in message and "'steps' for 'stpes'" in message
    assert "zzz'" in message and "for 'zzz'" not in message
    assert unknown_keys_message({"x"}, set(), "option(s)").endswith("known: none")


def test_known_keys_build_the_dataclass_and_split_keeps_the_rest():
    assert build(Knobs, {"steps": 5}, "knob(s)") == Knobs(steps=5)
    assert build(Knobs, None, "knob(s)") == Knobs()
    refuse_unknown({"lr": 1}, {"lr"}, "knob(s)")  # no error
    own, rest = split_known({"lr": 0.5, "momentum": 0.9}, Knobs)
    assert own == {"lr": 0.5} and rest == {"momentum": 0.9}


def test_a_missing_required_field_is_the_callers_error_type():
    @dataclass
    class Needs:
        name: str

    with pytest.raises(KnobError, match="needs: .*name"):
        build(Needs, {}, "needs", KnobError)
