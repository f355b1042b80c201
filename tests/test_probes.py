"""Probes: number formats, the int8 clipping sweep, NF4 / LLM.int8 errors, accumulation equivalence."""

import json

import pytest
import torch

from harness import cli
from harness.lab import probes


def test_number_formats_bits_range_and_count():
    result = probes.number_formats()
    assert result["kind"] == "probe" and result["probe"] == "number_formats" and result["device"] == "cpu"
    formats = result["formats"]
    bf16, fp16, fp32 = formats["bf16"], formats["fp16"], formats["fp32"]
    assert (bf16["bits"], bf16["exponent_bits"], bf16["fraction_bits"]) == (16, 8, 7)
    assert (fp16["bits"], fp16["exponent_bits"], fp16["fraction_bits"]) == (16, 5, 10)
    assert (fp32["bits"], fp32["exponent_bits"], fp32["fraction_bits"]) == (32, 8, 23)
    # Range is not count: fp16's largest finite value is 65504, and it has 63,488 finite bit patterns.
    assert fp16["max"] == 65504.0 and fp16["finite_values"] == 63_488
    assert fp16["finite_values_method"].startswith("enumerated")  # counted, not only the formula
    assert bf16["finite_values"] == 65_280 and fp32["finite_values"] == 2 ** 32 - 2 ** 24
    assert bf16["smallest_normal"] == fp32["smallest_normal"]  # same exponent field as fp32
    assert bf16["eps"] == 2.0 ** -7 and fp16["eps"] == 2.0 ** -10


def _heavy_tailed(seed=0):
    """Gaussian weights (std 0.02) with four outliers at 25 standard deviations."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(1024, 1024, generator=generator) * 0.02
    positions = torch.randperm(weight.numel(), generator=generator)[:4]
    weight.view(-1)[positions] = torch.tensor([0.5, -0.5, 0.5, -0.5])
    return weight


def test_clipping_below_max_beats_absmax_for_heavy_tailed_weights():
    weight = _heavy_tailed()
    info = {"source": "synthetic: gaussian with 4 outliers", "trained": False, "tensors": 1,
            "parameters": weight.numel()}
    result = probes.quantization_error(weights=[weight], weights_info=info)
    sweep = result["int8_absmax"]
    assert [row["clip_ratio"] for row in sweep][-1] == 1.0 and result["int8_levels"] == 255
    at_max = sweep[-1]
    best = min(sweep, key=lambda row: row["relative_rmse"])
    assert result["int8_absmax_best"]["clip_ratio"] == best["clip_ratio"] < 0.75
    assert best["relative_rmse"] < 0.8 * at_max["relative_rmse"]  # rounding error dominates at max|w|
    clipped = [row["clipped_fraction"] for row in sweep]
    assert all(a >= b for a, b in zip(clipped, clipped[1:])) and clipped[-1] == 0.0 and clipped[0] > 0.1
    # LLM.int8's per-row scales confine the outliers to their rows; NF4 works per block of 64.
    assert result["int8_rowwise"]["relative_rmse"] < best["relative_rmse"]
    assert 0.05 < result["nf4"]["relative_rmse"] < 0.12 and result["nf4"]["blocksize"] == 64


def test_gaussian_weights_are_best_clipped_near_their_max():
    weight = torch.randn(512, 512, generator=torch.Generator().manual_seed(1)) * 0.02
    sweep = probes.int8_absmax_sweep([weight])
    best = min(sweep, key=lambda row: row["relative_rmse"])
    assert best["clip_ratio"] >= 0.7 and best["relative_rmse"] < 0.012


@pytest.mark.parametrize("shape", [(256, 704), (704, 256)])
def test_nf4_probe_measures_the_weights_a_qlora_layer_computes_with(shape):
    """The probe's round trip equals what bitsandbytes' own Linear4bit multiplies by (read back by
    feeding it the identity), for the tiny preset's MLP shapes."""
    import bitsandbytes as bnb

    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 0.02
    out_features, in_features = shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=False, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.bfloat16(), requires_grad=False, quant_type="nf4", blocksize=64,
                                     compress_statistics=False)
    identity = torch.eye(in_features, dtype=torch.bfloat16, requires_grad=True)  # the training path
    restored = layer.to("cpu")(identity).float().t()
    error = float(((restored - weight) ** 2).sum().sqrt() / (weight ** 2).sum().sqrt())
    assert error == pytest.approx(probes.nf4_relative_rmse([weight]), rel=0.01)
    assert 0.05 < error < 0.15  # NF4's error on Gaussian weights


def test_tiny_preset_widths_are_whole_4bit_blocks():
    from harness.presets import preset_config

    config = preset_config("tiny-llama")
    assert config.hidden_size % 64 == 0 and config.intermediate_size % 64 == 0


def test_quantization_probe_on_a_random_init_preset_says_so():
    result = probes.quantization_error("tiny-llama")
    weights = result["weights"]
    assert weights["trained"] is False and "random init" in weights["source"]
    assert weights["tensors"] == 7 * 4  # q/k/v/o/gate/up/down in each of tiny-llama's 4 layers
    assert "not the trained-weight picture" in result["note"]
    assert result["versions"]["torch"] and result["versions"]["bitsandbytes"]


def test_accumulating_micro_batches_matches_one_batch_for_every_k():
    result = probes.accumulation_equivalence(ks=(1, 2, 4, 8), micro_batch=1, seq_len=16)
    assert [row["k"] for row in result["rows"]] == [1, 2, 4, 8]
    for row in result["rows"]:
        assert row["max_relative_gradient_error"] < 1e-4, row
        assert row["loss_difference"] < 1e-5, row
    # micro-batches with unequal token counts: a mean of means is not the batch's mean; the
    # summed token losses over the batch's count (transformers' num_items_in_batch) are
    uneven = result["uneven"]
    assert uneven["k"] == 8 and len(set(uneven["tokens_counted"])) == 8
    assert uneven["mean_of_means_error"] > 1e-2
    assert uneven["token_count_error"] < 1e-4


def test_probes_command_writes_its_files(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["probes", "--out", str(tmp_path), "--only", "number_formats"])
    assert exit_.value.code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["number_formats.json"]  # nothing half-written left
    written = json.loads((tmp_path / "number_formats.json").read_text())
    assert written["probe"] == "number_formats" and written["formats"]["fp16"]["finite_values"] == 63_488
    assert "fp16 5e/10f" in capsys.readouterr().out
    # a second run finds the file up to date and leaves it alone; --force recomputes it
    modified = (tmp_path / "number_formats.json").stat().st_mtime_ns
    for extra, recomputed in (([], False), (["--force"], True)):
        with pytest.raises(SystemExit):
            cli.main(["probes", "--out", str(tmp_path), "--only", "number_formats", *extra])
        assert ((tmp_path / "number_formats.json").stat().st_mtime_ns != modified) == recomputed
        assert ("up to date" in capsys.readouterr().out) != recomputed


def _fake_base(folder, seed):
    """A checkpoint folder laid out as `harness base` leaves one (weights and pretraining record)."""
    from transformers import AutoModelForCausalLM

    from harness.presets import preset_config
    from harness.step.checkpoint import PRETRAINING_FILE, weights_digest

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(preset_config("tiny-llama")).save_pretrained(folder)
    (folder / PRETRAINING_FILE).write_text(json.dumps({"weights_digest": weights_digest(folder)}))
    return str(folder)


def test_the_quantization_probe_knows_a_checkpoint_by_its_weights_not_where_it_is_cached(tmp_path):
    import shutil

    out = tmp_path / "probes"
    here = _fake_base(tmp_path / "one-machine" / "tiny-llama-0123456789", seed=0)
    [(path, result, ran)] = probes.run_probes(out, weights=here, only=["quantization_error"])
    assert ran and result["weights"]["trained"] and str(tmp_path) not in json.dumps(result)
    assert result["weights"]["source"].startswith("tiny-llama-0123456789@")
    # The same bytes cached elsewhere (another machine, another user) are the same weights: not rerun.
    elsewhere = tmp_path / "other-machine" / "tiny-llama-0123456789"
    shutil.copytree(here, elsewhere)
    assert not probes.run_probes(out, weights=str(elsewhere), only=["quantization_error"])[0][2]
    # A base pretrained anew with other weights is new weights: run again.
    shutil.rmtree(elsewhere)
    _fake_base(elsewhere, seed=1)
    [(_, rerun, ran)] = probes.run_probes(out, weights=str(elsewhere), only=["quantization_error"])
    assert ran and rerun["weights"]["identity"] != result["weights"]["identity"]
