"""The lab's own pretrained base and the loss comparison on it (CPU, small sizes)."""

import json
import math

import pytest
from conftest import EXPERIMENTS, run_dict

from harness.config import prepare, resolve
from harness.lab.pretrain import pretrain
from harness.report.loss import LOSS_RULES, loss_parity
from harness.step.checkpoint import Recipe, pretrained_here

pytestmark = pytest.mark.slow  # real training steps in subprocesses; `make test-fast` skips them

# The CPU recipe takes minutes; this one (150k tokens) takes about one and still learns: on held-out
# modules it ends well over a nat below the uniform loss (the full recipe ends about 3 nats below).
# Pretrained as this machine pretrains the lab's base: in fp32 where bf16 is emulated.
SMALL = pretrained_here(Recipe("tiny-llama", steps=150, seq_len=64, micro_batch=16, lr=5e-3, warmup_steps=10,
                               eval_every=50, eval_sequences=32, max_bytes=1_000_000), "cpu")
# Six steps of 4 x 64 tokens: where bf16 is emulated (AVX2), each bf16 fine-tune below still takes seconds.
FINETUNE = {"data": {"source": "stdlib-tests", "max_bytes": 400_000}, "seq_len": 64, "micro_batch": 4,
            "warmup_steps": 0, "steps": 6, "eval_every": 3, "eval_sequences": 16, "device": "cpu"}
LEARNING_RATES = {"fp32": 2e-4, "bf16-mixed": 2e-4, "lora": 2e-3, "qlora": 2e-3}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    record = pretrain(SMALL, "cpu", out, log=lambda *_: None)
    return record, out


@pytest.fixture(scope="module")
def finetunes(base, tmp_path_factory):
    """fp32, bf16-mixed, LoRA and QLoRA fine-tunes of the small base on the standard library's tests."""
    from harness.step.checkpoint import checkpoint_dir

    out = tmp_path_factory.mktemp("finetunes")
    records = {}
    for name, lr in LEARNING_RATES.items():
        config = resolve(EXPERIMENTS / f"{name}.yaml",
                         {**FINETUNE, "model": str(checkpoint_dir(SMALL)), "optim": {"lr": lr}})
        path, record = run_dict(config, out)
        record["_file"] = str(path)
        records[name] = record
    return records


def test_the_base_learns(base):
    record, out = base
    uniform = math.log(4096)
    assert record.uniform_loss == pytest.approx(uniform)
    start, end = record.held_out[0]["loss"], record.final_held_out_loss
    assert abs(start - uniform) < 0.5  # a random model is close to uniform ...
    assert end < uniform - 1.0          # ... the trained one is far below it, on modules it never saw
    assert record.data["source"] == "stdlib-lib" and record.held_out[-1]["step"] == SMALL.steps
    assert list(out.glob("base/cpu__tiny-llama-*.json"))


def test_model_base_names_the_pretrained_checkpoint(base, monkeypatch, tmp_path):
    from harness.step import checkpoint as base_module

    config = resolve(EXPERIMENTS / "fp32.yaml", {"model": "base", "device": "cpu"})
    assert config.base_checkpoint == "not pretrained yet"  # the test cache has no CPU-recipe base
    _, record = run_dict(config, tmp_path)
    assert record["status"] == "failed" and "make base" in record["error"]["message"]

    monkeypatch.setitem(base_module.RECIPES, "cpu", SMALL)  # now the small base is "the" CPU base
    pretrained = prepare(EXPERIMENTS / "fp32.yaml", {"model": "base", "device": "cpu"})
    assert pretrained["base_checkpoint"].startswith(base_module.recipe_id(SMALL) + "@")
    assert pretrained["config_hash"] != config.config_hash

    # The same weights pretrained on another machine (another time, another environment in the
    # pretraining record) are the same base: every fine-tune keeps its configuration hash.
    record_file = base_module.checkpoint_dir(SMALL) / base_module.PRETRAINING_FILE
    weights_file = base_module.checkpoint_dir(SMALL) / "model.safetensors"
    original, original_weights = record_file.read_text(), weights_file.read_bytes()
    elsewhere = json.loads(original)
    elsewhere.update(seconds=1.0, finished_at="2030-01-01T00:00:00+00:00", environment={"device_name": "elsewhere"})
    try:
        record_file.write_text(json.dumps(elsewhere))
        assert prepare(EXPERIMENTS / "fp32.yaml", {"model": "base", "device": "cpu"}) == pretrained
        weights_file.write_bytes(b"other weights")
        elsewhere.pop("weights_digest")  # a record without the digest: it is computed from the files
        record_file.write_text(json.dumps(elsewhere))
        retrained = prepare(EXPERIMENTS / "fp32.yaml", {"model": "base", "device": "cpu"})
        assert retrained["config_hash"] != pretrained["config_hash"]  # other weights: another configuration
    finally:
        record_file.write_text(original)
        weights_file.write_bytes(original_weights)


def test_every_finetune_evaluates_on_held_out_tests(finetunes):
    for name, record in finetunes.items():
        assert record["status"] == "ok", (name, record.get("error"))
        assert record["random_init"] is False and record["data"]["source"] == "stdlib-tests"
        steps = [point["step"] for point in record["loss"]["eval"]]
        assert steps == [0, 3, 6, 7]  # before training, every 3 steps, after the tracked step
        assert len(record["loss"]["per_step"]) == 7
    # every technique starts from the same weights and evaluates the same sequences: before any update
    # the losses differ only by the rounding of the weights (bf16, NF4)
    start = finetunes["fp32"]["loss"]["eval"][0]["loss"]
    assert finetunes["bf16-mixed"]["loss"]["eval"][0]["loss"] == pytest.approx(start, rel=1e-3)
    assert all(abs(r["loss"]["eval"][0]["loss"] - start) < 0.03 * start for r in finetunes.values())


def test_bf16_mixed_matches_fp32_and_qlora_stays_near_lora(finetunes):
    fp32 = finetunes["fp32"]["loss"]["eval_final"]
    assert fp32 < finetunes["fp32"]["loss"]["eval"][0]["loss"]  # fine-tuning lowers the held-out loss
    verdicts = {c.record["experiment"]: c for c in loss_parity(list(finetunes.values()))}
    assert set(verdicts) == {"bf16-mixed", "lora", "qlora"}
    bf16 = verdicts["bf16-mixed"]
    assert bf16.reference_loss == fp32
    assert abs(bf16.loss - fp32) / fp32 <= LOSS_RULES["bf16-mixed"].tolerance
    qlora = verdicts["qlora"]
    assert math.isfinite(qlora.loss) and qlora.reference_loss == finetunes["lora"]["loss"]["eval_final"]
    assert (qlora.loss - qlora.reference_loss) / qlora.reference_loss <= LOSS_RULES["qlora"].tolerance
    assert {c.verdict.kind for c in verdicts.values()} <= {"holds", "off"}


def _record(technique, loss, file, random_init=False, gradient_checkpointing=False, steps=60, status="ok"):
    config = {"technique": technique, "model": "base", "device": "cpu", "data": {"source": "stdlib-tests"},
              "steps": steps, "seq_len": 128, "micro_batch": 8, "grad_accum": 1, "eval_every": 20,
              "gradient_checkpointing": gradient_checkpointing}
    return {"experiment": technique + ("-gc" if gradient_checkpointing else ""), "status": status, "_file": file,
            "random_init": random_init, "config": config, "loss": {"eval_final": loss}}


def test_loss_verdicts_compare_within_one_comparison_only():
    records = [_record("fp32", 4.0, "a"), _record("bf16-mixed", 4.04, "b"), _record("bf16-pure", 4.2, "c"),
               _record("lora", 4.3, "d"), _record("qlora", 3.9, "e"), _record("qlora", 4.0, "f", True),
               _record("qlora", 4.1, "g", gradient_checkpointing=True),
               _record("adamw8bit", 4.0, "h", steps=30), _record("int8-lora", 9.0, "i", status="oom")]
    verdicts = {c.record["_file"]: c for c in loss_parity(records)}
    assert set(verdicts) == {"b", "c", "d", "e", "g", "h"}  # no baseline, random init or failed run
    assert verdicts["b"].verdict.kind == "holds" and verdicts["b"].ratio == pytest.approx(1.01)  # at the 1% edge
    assert verdicts["c"].verdict.kind == "off" and verdicts["c"].verdict.error == pytest.approx(0.05)
    assert verdicts["d"].verdict.kind == "off" and verdicts["d"].difference == pytest.approx(0.3)  # 7.5% > 5%
    assert verdicts["d"].reference["_file"] == "a"
    assert verdicts["e"].verdict.kind == "holds" and verdicts["e"].reference["_file"] == "d"  # below lora
    assert verdicts["g"].reference["_file"] == "d" and verdicts["g"].verdict.kind == "holds"  # checkpointing: same
    assert verdicts["h"].verdict.kind == "not yet checked" and verdicts["h"].reference is None  # other steps
