"""The record format, the public loader, the registries and the import layering."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from conftest import EXPERIMENTS, ROOT

import harness
from harness import schema
from harness.config import ConfigError, experiment_of, load_experiment, prepare, resolve_technique
from harness.predict.analytic import predict as analytic_predict
from harness.presets import preset_config
from harness.report.load import load_results

FIXTURE = ROOT / "tests" / "fixtures" / "report-results"


def _a_run_record() -> Path:
    return next(p for p in schema.find_records(FIXTURE) if p.parent.name == "cpu")


def test_every_committed_record_reads_through_the_schema():
    results = ROOT / "results"
    for path in schema.find_records(results):
        record = schema.read(path, "run")
        assert isinstance(record, schema.RunRecord) and schema.value_problems(record) == [], path
    for folder, kind in (("predictions", "prediction"), ("probes", "probe"), ("base", "base")):
        for path in (results / folder).glob("*.json"):
            record = schema.read(path, kind)
            assert record.KIND == kind and record.schema_version <= record.VERSION
            # written back, a record is the same JSON object (nothing lost, extra keys included)
            assert schema.to_dict(record) | json.loads(path.read_text()) == schema.to_dict(record)


def test_every_model_config_a_committed_record_names_is_in_the_repository(monkeypatch):
    """A record's `model` that is a config.json path resolves from the repository's root, and the model it
    builds has the base parameters the record counted (its total, less its adapter's trainable ones)."""
    import torch
    from transformers import AutoModelForCausalLM

    from harness.step.models import resolve_source

    monkeypatch.chdir(ROOT)  # where the bench ran, and what the path is relative to
    records = [schema.read(path, "run") for path in schema.find_records(ROOT / "results")]
    named = [record for record in records if record.model.endswith(".json")]
    assert named  # the held-out Gemma-2-2B shape measured on the H200
    for record in named:
        if record.parameters is None:
            continue
        config = resolve_source(record.model).config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        adapter = record.parameters.trainable if record.config["adapter"] != "none" else 0
        assert sum(p.numel() for p in model.parameters()) == record.parameters.total - adapter, record.model


def test_a_newer_or_unknown_record_is_refused_naming_the_file(tmp_path):
    data = json.loads(_a_run_record().read_text())
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**data, "schema_version": schema.RunRecord.VERSION + 1}))
    with pytest.raises(schema.RecordError, match=r"newer\.json: run record of schema version 2; this code reads "
                                                 r"up to version 1"):
        schema.read(newer)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"kind": "measurement", "status": "ok"}))
    with pytest.raises(schema.RecordError, match=r"unknown\.json: unknown record kind 'measurement'"):
        schema.read(unknown)
    truncated = tmp_path / "cut.json"
    truncated.write_text(json.dumps({k: v for k, v in data.items() if k != "config_hash"}))
    with pytest.raises(schema.RecordError, match=r"cut\.json: a run record needs config_hash"):
        schema.read(truncated)
    with pytest.raises(schema.RecordError, match="a run record where a prediction record was expected"):
        schema.read(_a_run_record(), "prediction")


def test_the_report_lists_a_newer_record_as_not_read_and_renders_the_rest(tmp_path):
    root = tmp_path / "results"
    shutil.copytree(FIXTURE, root)
    victim = _a_run_record().relative_to(FIXTURE)
    data = json.loads((root / victim).read_text())
    (root / victim).write_text(json.dumps({**data, "schema_version": 99}))
    results = load_results(root)
    assert any(str(victim) in line and "schema version 99" in line for line in results.skipped)
    assert str(victim) not in {r["_file"] for r in results.records} and results.records


def test_load_results_gives_every_run_as_one_frame():
    runs = harness.load_results(FIXTURE)
    on_disk = schema.find_records(FIXTURE)
    assert len(runs) == len(on_disk) and {"experiment", "peak_allocated", "tokens_per_s", "status"} <= set(runs)
    assert set(runs["file"]) == {str(p.relative_to(FIXTURE)) for p in on_disk}
    predictions = harness.load_results(FIXTURE, "predictions")
    assert len(predictions) == len(list((FIXTURE / "predictions").glob("*.json")))
    with pytest.raises(ValueError, match="one of runs, predictions"):
        harness.load_results(FIXTURE, "probes")


def test_two_records_of_one_configuration_fold_into_the_newest(tmp_path):
    """A base pretrained again elsewhere (same recipe) or a rerun: one row, and the count folded."""
    root = tmp_path / "results"
    shutil.copytree(FIXTURE, root)
    original = _a_run_record().relative_to(FIXTURE)
    data = json.loads((root / original).read_text())
    twin = {**data, "config": {**data["config"], "base_checkpoint": "tiny-llama-0@elsewhere", "run_id": "x"},
            "finished_at": "2099-01-01T00:00:00+00:00", "config_hash": "f" * 64}
    (root / original.parent / "twin.json").write_text(json.dumps(twin))
    results = load_results(root)
    assert results.folded == 1
    kept = [r for r in results.records if r["experiment"] == data["experiment"] and r["model"] == data["model"]
            and r["config"].get("run_id") in ("x", data["config"].get("run_id"))]
    assert [r["_file"] for r in kept] == [str(original.parent / "twin.json")]  # the newest speaks
    assert [r["_file"] for r in results.folded_records] == [str(original)]  # the older kept aside


def test_a_run_under_an_allocator_setting_is_its_own_and_kept_out_of_the_default_allocators_tables(tmp_path):
    from harness.report.load import records_frame

    root = tmp_path / "results"
    shutil.copytree(FIXTURE, root)
    original = _a_run_record().relative_to(FIXTURE)
    data = json.loads((root / original).read_text())
    environment = {**(data.get("environment") or {}), "cuda_alloc_conf": "expandable_segments:True"}
    setting = {**data, "environment": environment, "finished_at": "2099-01-01T00:00:00+00:00"}
    (root / original.parent / "expandable.json").write_text(json.dumps(setting))
    results = load_results(root)
    assert results.folded == 0 and str(original) in {r["_file"] for r in results.records}  # nothing replaced
    assert [r["_file"] for r in results.allocator_records] == [str(original.parent / "expandable.json")]
    assert "expandable.json" not in " ".join(r["_file"] for r in results.records)
    assert list(records_frame(results.allocator_records)["cuda_alloc_conf"]) == ["expandable_segments:True"]


def test_one_measurement_under_two_experiment_names_folds_into_the_newest(tmp_path):
    """lora-ga4 is lora at accumulation 4: a run of each measures one configuration, shown once; a run that
    differs in a setting is another measurement."""
    root = tmp_path / "results"
    shutil.copytree(FIXTURE, root)
    original = _a_run_record().relative_to(FIXTURE)
    data = json.loads((root / original).read_text())
    renamed = {**data, "experiment": "renamed", "config": {**data["config"], "name": "renamed"},
               "finished_at": "2099-01-01T00:00:00+00:00"}
    (root / original.parent / "renamed.json").write_text(json.dumps(renamed))
    other = {**renamed, "config": {**renamed["config"], "seed": 12345}}
    (root / original.parent / "other.json").write_text(json.dumps(other))
    results = load_results(root)
    files = {r["_file"] for r in results.records}
    assert results.folded == 1 and str(original) not in files
    assert {str(original.parent / "renamed.json"), str(original.parent / "other.json")} <= files

def test_a_run_is_compared_with_the_reference_on_its_own_base_even_one_folded_away():
    """The recipe pretrained on two CPUs gives two bases; the newest bf16-pure run is on the second, and a
    run on the first compares with the first's bf16-pure run (folded in the other tables), never across."""
    from harness.report.loss import loss_parity

    def run(experiment, base, loss, file):
        config = {"technique": experiment, "model": "base", "device": "cpu", "data": {"source": "stdlib-tests"},
                  "steps": 30, "seq_len": 128, "micro_batch": 8, "grad_accum": 1, "base_checkpoint": base}
        return {"experiment": experiment, "status": "ok", "_file": file, "random_init": False, "config": config,
                "loss": {"eval_final": loss}}

    shown = [run("bf16-pure", "tiny@new", 5.0, "new-bf16"), run("ao-adamw8bit", "tiny@old", 5.3, "old-ao"),
             run("ao-adamw4bit", "tiny@new", 5.01, "new-ao4")]
    folded = [run("bf16-pure", "tiny@old", 5.29, "old-bf16")]
    verdicts = {c.record["_file"]: c for c in loss_parity(shown, folded)}
    assert verdicts["old-ao"].reference["_file"] == "old-bf16" and verdicts["old-ao"].verdict.kind == "holds"
    assert verdicts["new-ao4"].reference["_file"] == "new-bf16"  # a shown run first
    alone = {c.record["_file"]: c for c in loss_parity(shown)}
    assert alone["old-ao"].reference is None  # across bases there is no comparison
    # the figure draws the same comparisons: a panel per base, each with its own reference
    from harness.report.figures import final_losses, loss_panels
    from harness.report.load import Results

    results = Results(root=Path("."), records=shown, folded_records=folded)
    panels = {runs["bf16-pure"]["config"]["base_checkpoint"]: ({e: r["_file"] for e, r in runs.items()}, references)
              for runs, references in loss_panels(results).values()}
    assert panels == {"tiny@old": ({"ao-adamw8bit": "old-ao", "bf16-pure": "old-bf16"}, {"bf16-pure"}),
                      "tiny@new": ({"ao-adamw4bit": "new-ao4", "bf16-pure": "new-bf16"}, {"bf16-pure"})}
    assert final_losses(results).png


def test_a_record_written_and_read_is_the_same_typed_record(tmp_path):
    record = schema.read(_a_run_record(), "run")
    assert isinstance(record.memory, schema.Memory) and isinstance(record.loss, schema.Loss)
    copy = schema.read(schema.write(tmp_path / "copy.json", record), "run")
    assert copy == record


def test_adding_a_field_later_keeps_the_hash_of_earlier_configurations():
    """The LoRA variants' fields were added after records existed: at their original values
    they leave the configuration hash of every earlier record as it was."""
    committed = json.loads((ROOT / "results" / "nvidia-h200" / "qlora__llama-2-7b__38ff568cb71a.json").read_text())
    config = prepare(EXPERIMENTS / "qlora.yaml", {"model": "llama-2-7b", "seq_len": 512, "micro_batch": 1,
                                                  "device": "cuda"})
    assert config["lora"]["use_dora"] is False and "use_dora" not in committed["config"]["lora"]
    assert config["config_hash"] == committed["config_hash"]
    # a later record, whose config has every field of today, is the same configuration: the report
    # folds the two into the newer
    later = json.loads((ROOT / "results" / "nvidia-h200" / "qlora__llama-2-7b__0619b14b2988.json").read_text())
    assert later["config"]["optimizer_in_backward"] is False
    assert schema.configuration_key(later, "nvidia-h200") == schema.configuration_key(committed, "nvidia-h200")
    dora = prepare(EXPERIMENTS / "dora.yaml", {"model": "llama-2-7b", "seq_len": 512, "micro_batch": 1,
                                               "device": "cuda"})
    assert dora["config_hash"] != config["config_hash"]


def test_a_new_adapter_and_optimizer_are_one_registry_entry_each(monkeypatch, tmp_path):
    """Registered the way the README's "Extending the lab" says: validated, and predicted by
    the analytic method through the registry (no string compared to 'lora')."""
    from harness.blocks import adapters, optimizers
    from harness.blocks.parts import Unmapped

    half_rank = adapters.Adapter(wrap=lambda model, settings: model,
                                 trainable_tensors=lambda n_in, n_out, settings: [settings.r * n_in],
                                 summary="LoRA's A matrices only", loss="not compared", shown_by=None)
    monkeypatch.setitem(adapters.ADAPTERS, "a-only", half_rank)
    my_sgd = optimizers.Optimizer(build=lambda params, settings, device_type, model=None: None,
                                  state_bytes=lambda sizes, param_bytes, shape, settings, device_type: (0, 0),
                                  trainer=Unmapped("not in transformers"), summary="SGD without momentum",
                                  not_sharded=None, loss="not compared", shown_by=None)
    monkeypatch.setitem(optimizers.OPTIMIZERS, "my-sgd", my_sgd)
    path = tmp_path / "mine.yaml"
    path.write_text("technique: lora\nadapter: a-only\noptimizer: my-sgd\n")
    name, experiment = load_experiment(path)
    technique = resolve_technique(experiment)
    assert (technique.adapter, technique.optimizer) == ("a-only", "my-sgd")
    config = preset_config("tiny-llama")
    mine = analytic_predict(config, technique, experiment, 64, 2)
    lora = analytic_predict(config, resolve_technique(experiment_of({**dataclasses.asdict(experiment),
                                                                     "adapter": "lora", "optimizer": None})),
                            experiment, 64, 2)
    assert 0 < mine["parameters"]["trainable"] < lora["parameters"]["trainable"]
    assert mine["persistent"]["optimizer_state"] == 0 < lora["persistent"]["optimizer_state"]
    path.write_text("technique: lora\nadapter: b-only\n")
    with pytest.raises(ConfigError, match="unknown adapter 'b-only'; registered: none, lora, a-only"):
        load_experiment(path)


def test_peft_fields_are_checked_against_peft():
    with pytest.raises(ConfigError, match=r"lora\.peft\.use_dorra.*not a field of peft's LoraConfig"):
        load_experiment(EXPERIMENTS / "lora.yaml", {"lora": {"peft": {"use_dorra": True}}})
    with pytest.raises(ConfigError, match=r"lora\.peft\.use_dora.*in the lora block itself"):
        load_experiment(EXPERIMENTS / "lora.yaml", {"lora": {"peft": {"use_dora": True}}})
    _, experiment = load_experiment(EXPERIMENTS / "lora.yaml", {"lora": {"peft": {"bias": "lora_only"}}})
    assert experiment.lora.peft == {"bias": "lora_only"}
