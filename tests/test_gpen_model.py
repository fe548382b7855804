import json
import pickle

import numpy as np
import pytest
import torch

from tests.conftest import DATA, TINY
from gpen import RELEASED_CONFIGS, CheckpointError, FullGenerator, GPENConfig, infer_config, load_generator
from gpen.checkpoint import release_name
from gpen.model import EqualLinear, ModulatedConv2d
from tests.support.reference import reference_forward
from gpen.testing import deterministic_input, deterministic_state_dict, official_key_shapes

GOLDEN = np.load(DATA / "gpen_golden.npz")
GOLDEN_CASES = {"GPEN-BFR-256": RELEASED_CONFIGS["GPEN-BFR-256"], "GPEN-BFR-512": RELEASED_CONFIGS["GPEN-BFR-512"],
                "tiny-32": TINY}


@pytest.fixture(scope="module")
def tiny_state():
    return deterministic_state_dict(TINY)


def test_key_layout_spec_matches_the_official_code_for_every_release():
    official = json.loads((DATA / "official_keys.json").read_text())
    for name, cfg in RELEASED_CONFIGS.items():
        assert {k: list(v) for k, v in official_key_shapes(cfg).items()} == official[name], name


# the 1024 and 2048 layouts (~8 s each to build) under -m slow; their key lists are checked above
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if RELEASED_CONFIGS[n].size > 512 else n
                                  for n in RELEASED_CONFIGS])
def test_official_layout_loads_strictly_and_infers_its_config(name):
    cfg = RELEASED_CONFIGS[name]
    state = deterministic_state_dict(cfg)
    assert infer_config(state) == cfg
    assert release_name(infer_config(state)) == name
    model = load_generator(state)
    assert isinstance(model, FullGenerator) and not model.training
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in ("ecd1.0.0.kernel", "generator.to_rgbs.0.upsample.kernel"))


def test_parameter_counts_match_gpen_notes():
    counts = {name: sum(v.numel() for k, v in deterministic_state_dict(cfg).items() if not k.endswith(".kernel"))
              for name, cfg in list(RELEASED_CONFIGS.items())[:2]}
    assert counts == {"GPEN-BFR-256": 18_879_010, "GPEN-BFR-512": 71_005_223}


@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_output_matches_the_official_implementation(name):
    cfg = GOLDEN_CASES[name]
    batch, stride = int(GOLDEN[f"{name}/batch"]), int(GOLDEN[f"{name}/stride"])
    model = load_generator(deterministic_state_dict(cfg))
    with torch.inference_mode():
        out = model(deterministic_input(batch, cfg.size))
    assert out.shape == (batch, 3, cfg.size, cfg.size)
    diff = np.abs(out[:, :, ::stride, ::stride].numpy() - GOLDEN[f"{name}/output_strided"]).max()
    assert diff < 1e-4, diff  # the acceptance bound is 1e-3
    assert abs(out.double().mean().item() - float(GOLDEN[f"{name}/mean"])) < 1e-5


def test_fast_path_equals_the_grouped_reference_formulation(tiny_state):
    model = load_generator(tiny_state)
    x = deterministic_input(3, TINY.size, seed=7)
    with torch.inference_mode():
        assert torch.allclose(model(x), reference_forward(model, x), atol=1e-5)


def test_output_is_raw_and_unclamped(tiny_state):
    with torch.inference_mode():
        out = load_generator(tiny_state)(deterministic_input(2, TINY.size))
    assert out.abs().max() > 1.0  # the official network does not squash its output either


def test_a_batch_equals_single_calls_and_is_deterministic(tiny_state):
    model = load_generator(tiny_state)
    x = deterministic_input(4, TINY.size, seed=3)
    with torch.inference_mode():
        batched = model(x)
        singles = torch.cat([model(x[i:i + 1]) for i in range(4)])
        again = model(x)
    assert torch.allclose(batched, singles, atol=1e-5)
    assert torch.equal(batched, again)


def test_checkpoint_files_and_g_ema_wrappers_load(tmp_path, tiny_state):
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "train.pt"
    torch.save(tiny_state, plain)
    torch.save({"g_ema": tiny_state, "g": tiny_state, "d": {"x": torch.zeros(1)}}, wrapped)
    x = deterministic_input(1, TINY.size)
    with torch.inference_mode():
        assert torch.equal(load_generator(plain)(x), load_generator(wrapped)(x))


def test_reloading_weights_into_a_model_refreshes_cached_derived_tensors(tiny_state):
    other = deterministic_state_dict(TINY, seed=1)
    model = load_generator(tiny_state)
    x = deterministic_input(2, TINY.size)
    with torch.inference_mode():
        model(x)
    model.load_state_dict(other)
    with torch.inference_mode():
        assert torch.allclose(model(x), load_generator(other)(x), atol=1e-6)


@pytest.mark.parametrize("dtype, mean_tol, max_tol", [(torch.float16, 0.003, 0.03), (torch.bfloat16, 0.02, 0.15)])
def test_half_precisions_stay_close_to_float32(tiny_state, dtype, mean_tol, max_tol):
    x = deterministic_input(2, TINY.size, seed=5)
    with torch.inference_mode():
        ref = load_generator(tiny_state)(x)
        half = load_generator(tiny_state, dtype=dtype)(x)
    assert half.dtype == torch.float32  # returned in the input's dtype
    diff = (half - ref).abs()
    assert diff.mean() < mean_tol and diff.max() < max_tol, (diff.mean(), diff.max())


def test_half_precision_keeps_the_latent_path_in_float32(tiny_state):
    model = load_generator(tiny_state, dtype=torch.float16)
    linears = [m for m in model.modules() if isinstance(m, EqualLinear)]
    convs = [m for m in model.modules() if isinstance(m, ModulatedConv2d)]
    assert linears and all(m.weight.dtype == torch.float32 for m in linears)
    assert all(m.weight.dtype == torch.float16 for m in convs)


def test_fp16_stays_finite_when_styles_are_huge(tiny_state):
    """Undemodulated activations can exceed fp16's range; the per-sample normalisation and the
    float32 demodulation keep the result finite and close to float32."""
    state = {k: (v * 3e3 if k.endswith("modulation.bias") else v) for k, v in tiny_state.items()}
    x = deterministic_input(2, TINY.size)
    with torch.inference_mode():
        ref = load_generator(state)(x)
        half = load_generator(state, dtype=torch.float16)(x)
    assert ref.abs().max() > 1e3  # the un-demodulated RGB layers scale the output with the styles
    assert torch.isfinite(half).all()
    assert (half - ref).abs().mean() / ref.abs().mean() < 2e-3


def test_layouts_that_match_no_config_give_a_clear_error(tiny_state):
    missing = {k: v for k, v in tiny_state.items() if k != "generator.conv1.noise.weight"}
    with pytest.raises(CheckpointError, match="missing.*generator.conv1.noise.weight"):
        load_generator(missing)
    wrong = dict(tiny_state, **{"generator.to_rgb1.bias": torch.zeros(1, 4, 1, 1)})
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_generator(wrong)
    with pytest.raises(CheckpointError, match="not a GPEN generator"):
        load_generator({"conv.weight": torch.zeros(3, 3)})


def test_corrupt_and_non_weight_files_give_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="not a readable PyTorch weights file"):
        load_generator(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        load_generator(tmp_path / "missing.pth")


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoints_with_pickled_code_are_refused(tmp_path):
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"ecd0.0.0.weight": _Payload()}, f)
    with pytest.raises(CheckpointError):
        load_generator(evil)


def test_non_power_of_two_sizes_are_rejected():
    with pytest.raises(ValueError, match="power of two"):
        GPENConfig(300)
