"""Static layouts: golden presets, string forms, derived facts, validation, CLI."""

import json
import pathlib
import subprocess
import sys

import pytest

from kvshare_jax.layout import KVLayout, from_spec, preset

GOLDEN = pathlib.Path(__file__).parent / "data" / "presets.json"
SHARED = pathlib.Path(__file__).parents[2] / "shared" / "presets.json"
PRESETS = json.loads(GOLDEN.read_text())


def test_golden_file_matches_shared_copy():
    if not SHARED.exists():
        pytest.skip("../shared/presets.json not present in this checkout")
    assert json.loads(SHARED.read_text()) == PRESETS


@pytest.mark.parametrize("key", sorted(PRESETS))
def test_golden_preset(key):
    name, n, l_ = key.split("/")
    layers, kv = int(n[1:]), int(l_[1:])
    part, position = name.split("-")
    assert str(preset(part, position, layers, kv)) == PRESETS[key]
    assert str(from_spec(f"{name}:{kv}", layers)) == PRESETS[key]
    assert preset(part, position, layers, kv).num_kv_layers == kv


@pytest.mark.parametrize("text", ["0_6_6_6_6_6_6_7", "0s_1s_2_2", "0_1_2_3", "3_3_3_3", "0s_2_2s"])
def test_string_round_trip(text):
    layout = KVLayout.parse(text)
    assert str(layout) == text
    assert KVLayout.parse(str(layout)) == layout
    assert hash(KVLayout.parse(text)) == hash(layout)


def test_named_methods():
    assert str(from_spec("standard", 4)) == "0_1_2_3"
    assert str(from_spec("cla:2", 6)) == "0_0_2_2_4_4"
    assert str(from_spec("cla:4", 6)) == "0_0_0_3_3_3"  # l = ceil(6/4) = 2 blocks
    assert str(from_spec("lckv:1", 8)) == "0_7_7_7_7_7_7_7"
    assert str(from_spec("lckv:2", 8)) == "0_6_6_6_6_6_6_7"
    assert str(from_spec("mlkv:2", 8)) == "0_0_0_0_4_4_4_4"
    assert str(from_spec("yoco", 8)) == "0s_1s_2s_3s_4_4_4_4"
    assert str(from_spec("yoco", 6)) == "0s_1s_2s_3_3_3"


def test_derived_facts():
    layout = KVLayout.parse("0_6_6_6_6_6_6_7")
    assert layout.kv_layers == (0, 6, 7)
    assert layout.slot_of_layer == (0, 1, 1, 1, 1, 1, 1, 2)
    assert layout.upward_layers == (1, 2, 3, 4, 5)
    assert [(b.start, b.end) for b in layout.cyclic_blocks] == [(1, 6)]
    assert layout.segments == ((0, 0, False), (1, 6, True), (7, 7, False))
    assert layout.cache_fraction == 3 / 8


@pytest.mark.parametrize(
    "text, blocks",
    [
        ("0_1_2_3", []),
        ("3_3_3_3", [(0, 3)]),
        ("2_2_2_5_5_5", [(0, 2), (3, 5)]),
        ("2_3_2_3", [(0, 3)]),  # layer 1 -> 3 extends the block started by layer 0 -> 2
        ("0_0_0_0", []),  # downward only: no iteration
        ("0_3_0_3_4", [(1, 3)]),  # layer 2 -> 0 is downward inside the block
    ],
)
def test_cyclic_blocks(text, blocks):
    layout = KVLayout.parse(text)
    assert [(b.start, b.end) for b in layout.cyclic_blocks] == blocks


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: KVLayout.parse("0_1_x"), "layer 2"),
        (lambda: KVLayout.parse("0_1_2", num_layers=4), "expected 4"),
        (lambda: KVLayout.parse("0_5_2"), "layer 1: target 5 is out of range"),
        (lambda: KVLayout.parse("0_2_1"), "layer 1: target 2 is not a KV layer"),
        (lambda: from_spec("lasagna-bottom:0", 8), r"KV layers must be in \[1, 8\]"),
        (lambda: from_spec("lasagna-bottom:9", 8), r"KV layers must be in \[1, 8\]"),
        (lambda: from_spec("tiramisu-top:2", 8), "unknown layout"),
        (lambda: from_spec("pizza-top", 8), "integer argument"),
        (lambda: from_spec("cla:0", 8), "block size"),
        (lambda: KVLayout((0, 1), (True,)), "sliding flags"),
    ],
)
def test_validation_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "kvshare_jax.cli", "layout", *args],
        capture_output=True,
        text=True,
    )


def test_cli_preset_and_string():
    out = _cli("sandwich-middle", "--layers", "22", "--kv-layers", "11")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == PRESETS["sandwich-middle/L22/l11"]
    assert "cyclic blocks: [5..10]" in out.stdout
    assert "0.5000" in out.stdout
    out = _cli("0_6_6_6_6_6_6_7")
    assert out.returncode == 0 and out.stdout.splitlines()[0] == "0_6_6_6_6_6_6_7"


@pytest.mark.parametrize(
    "args", [("0_9_2",), ("sandwich-middle", "--kv-layers", "3"), ("bogus:3", "--layers", "8")]
)
def test_cli_bad_input_is_one_line_error(args):
    out = _cli(*args)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
