"""The package's imports go downwards only: every import of a harness module, at the top of a file or
inside a function, names a module of a lower layer (or one of its own layer that does not import it
back), so no two modules import each other, directly or round a circle."""

from __future__ import annotations

from harness.imports import LAYERS, harness_imports, layer_of, module_files


def test_every_module_has_a_layer():
    assert [name for name in module_files() if layer_of(name) is None] == []


def test_no_module_imports_one_of_a_higher_layer():
    upward = [f"{name} (layer {LAYERS[layer_of(name)]}) imports {imported} (layer {LAYERS[layer_of(imported)]})"
              for name, imported_names in harness_imports().items() for imported in imported_names
              if layer_of(imported) > layer_of(name)]
    assert upward == []


def test_no_import_circle():
    graph = harness_imports()
    done: set[str] = set()

    def walk(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, "import circle: " + " -> ".join(path[path.index(name):] + (name,))
        if name in done:
            return
        for imported in graph[name]:
            walk(imported, path + (name,))
        done.add(name)

    for name in graph:
        walk(name, ())
    assert done == set(graph)


def test_the_lowest_layer_imports_nothing_of_the_lab_and_config_error_lives_there():
    from harness import errors
    from harness.config import ConfigError
    from harness.step import models

    assert ConfigError is errors.ConfigError is models.ConfigError
    assert harness_imports()["harness.errors"] == set()
    assert "harness.config" not in harness_imports()["harness.step.models"]


def test_predict_lives_in_the_predict_package_below_its_command_line():
    graph = harness_imports()
    assert "harness.predict.prediction" in graph["harness.predict.command"]
    for searcher in ("harness.predict.search", "harness.predict.gpus", "harness.predict.confirm"):
        assert "harness.predict.prediction" in graph[searcher] and "harness.predict.command" not in graph[searcher]


def test_a_digest_covers_every_module_the_code_imports():
    from harness.lab.probes import PROBE_MODULES
    from harness.predict.prediction import PREDICTOR_MODULES

    # the simulation's step reaches DeepSpeed's module through step/train.py: a list kept by hand missed such files
    assert {"predict/prediction.py", "predict/analytic.py", "predict/simulate.py", "step/train.py", "step/zero.py",
            "techniques.py", "config.py"} <= set(PREDICTOR_MODULES)
    assert {"lab/probes.py", "step/data.py", "step/models.py"} <= set(PROBE_MODULES)
    assert not any(name.startswith(("report/", "lab/")) for name in PREDICTOR_MODULES)


def test_the_report_reads_records_never_the_code_that_made_them():
    code = ("harness.lab", "harness.step", "harness.predict", "harness.measure.worker", "harness.engines.")
    reads_code = [f"{name} -> {imported}" for name, imported_names in harness_imports().items()
                  if name.startswith("harness.report") for imported in imported_names if imported.startswith(code)]
    assert reads_code == []
