from __future__ import annotations

from pathlib import Path

import pytest

from kdsearch.config import to_dict
from kdsearch.errors import ConfigError
from kdsearch.search.studyfile import (
    apply_overrides,
    build_spec,
    check_study_name,
    load_study,
    parse_number_list,
    parse_value,
    read_study_file,
    with_params,
)
from kdsearch.search.tune import GRID
from tests.fakes import CPU_QUICK, PAPER, REPO, SMOKE

MINIMAL = {"name": "t", "teacher": {"checkpoint": "teacher.pt"}}


def test_shipped_study_files_validate():
    smoke, quick, paper = load_study(SMOKE), load_study(CPU_QUICK), load_study(PAPER)
    assert len(GRID.points(smoke.grid.axes())) == 4
    assert smoke.teacher.train is not None and smoke.train.data.dataset == "synthetic"
    assert len(GRID.points(quick.grid.axes())) == 12
    assert quick.train.data.label == "CIFAR-10 (JPEG q75 copy)"
    assert paper.train.student.drop_blocks == 5 and paper.train.batch_size == 64 and paper.train.epochs == 100
    assert paper.train.optim.optimizer == "adam" and paper.train.optim.lr == 1e-3
    assert all(5 <= len(values) <= 9 for values in (paper.grid.t, paper.grid.alpha, paper.grid.p))
    assert (2.5, 0.01, 0.1) in {(pt["t"], pt["alpha"], pt["p"]) for pt in GRID.points(paper.grid.axes())}


def test_the_teacher_initialised_ablation_differs_from_the_real_data_one_only_where_it_says():
    studies = SMOKE.parents[1] / "studies"
    scratch = to_dict(load_study(studies / "cifar10-ablation.yaml").train)
    teacher_init = to_dict(load_study(studies / "cifar10-ablation-teacher-init.yaml").train)
    changed = {key for key in scratch if scratch[key] != teacher_init[key]}
    assert changed == {"student_init", "epochs"}  # same data, teacher and IG settings: one shared IG cache
    assert teacher_init["student_init"] == "teacher" and teacher_init["epochs"] == 3


def test_cpu_quick_paths_are_relative_to_the_working_directory(monkeypatch):
    monkeypatch.chdir(SMOKE.parents[1])
    spec = load_study(CPU_QUICK)
    assert spec.train.data.data_dir == str((SMOKE.parents[2] / "shared" / "data" / "cifar10-jpeg").resolve())
    assert spec.teacher.checkpoint.endswith("shared/models/mobilenetv2_cifar10jpeg_teacher.pt")
    assert spec.train.teacher_checkpoint == spec.teacher.checkpoint


def test_unknown_top_level_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown study file key\(s\) \['gird'\]"):
        build_spec({**MINIMAL, "gird": {}})


def test_unknown_train_key_is_named():
    with pytest.raises(ConfigError, match="epoch"):
        build_spec({**MINIMAL, "train": {"epoch": 3}})


def test_unknown_grid_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown grid key\(s\) \['T'\]"):
        build_spec({**MINIMAL, "grid": {"T": [1, 2]}})


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"t": [1, "two"]}, "grid t must be a number but got 'two'"),
        ({"alpha": [0.1, 1.5]}, r"grid alpha must be in \[0, 1\] but got 1.5"),
        ({"p": [-0.1]}, r"grid p must be in \[0, 1\] but got -0.1"),
        ({"t": [0]}, "grid t .* must be > 0"),
        ({"t": [1, 1.0]}, "repeated"),
        ({"alpha": [True]}, "must be a number"),
    ],
)
def test_bad_grid_values(grid, message):
    with pytest.raises(ConfigError, match=message):
        build_spec({**MINIMAL, "grid": grid})


def test_grid_axis_not_given_is_held_at_the_base_value():
    spec = build_spec({**MINIMAL, "train": {"kd": {"alpha": 0.2}}, "grid": {"t": [1, 2]}})
    assert spec.grid.alpha == (0.2,) and spec.grid.p == (0.1,)
    assert len(GRID.points(spec.grid.axes())) == 2


def test_number_list_flag():
    assert parse_number_list("--t", "1, 2.5,5") == [1.0, 2.5, 5.0]
    with pytest.raises(ConfigError, match="--alpha takes comma-separated numbers but got 'x'"):
        parse_number_list("--alpha", "0.1,x")
    with pytest.raises(ConfigError, match="finite"):
        parse_number_list("--t", "inf")


def test_yaml_and_toml_give_the_same_spec(tmp_path):
    (tmp_path / "s.yaml").write_text(
        "name: s\nteacher: {checkpoint: t.pt}\ntrain: {epochs: 3, data: {dataset: synthetic}}\ngrid: {t: [1, 2]}\n"
    )
    (tmp_path / "s.toml").write_text(
        'name = "s"\n[teacher]\ncheckpoint = "t.pt"\n[train]\nepochs = 3\n[train.data]\ndataset = "synthetic"\n'
        "[grid]\nt = [1, 2]\n"
    )
    yaml_spec, toml_spec = load_study(tmp_path / "s.yaml"), load_study(tmp_path / "s.toml")
    assert to_dict(yaml_spec.train) == to_dict(toml_spec.train)
    assert yaml_spec.grid == toml_spec.grid


def test_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        read_study_file(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        read_study_file(tmp_path / "missing.yaml")
    (tmp_path / "s.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"\.yaml, \.yml or \.toml"):
        read_study_file(tmp_path / "s.json")


def test_name_defaults_to_the_file_stem(tmp_path):
    (tmp_path / "my-study.yaml").write_text("teacher: {checkpoint: t.pt}\n")
    assert load_study(tmp_path / "my-study.yaml").name == "my-study"


def test_overrides_set_dotted_keys_and_are_validated():
    raw = apply_overrides(MINIMAL, {"train.epochs": 2, "train.data.train_subset": 50})
    assert raw["train"] == {"epochs": 2, "data": {"train_subset": 50}}
    assert "train" not in MINIMAL  # the input is not modified
    with pytest.raises(ConfigError, match="epochz"):
        build_spec(apply_overrides(MINIMAL, {"train.epochz": 2}))
    assert parse_value("0.5") == 0.5 and parse_value("[1, 2]") == [1, 2] and parse_value("cpu") == "cpu"


def test_teacher_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one"):
        build_spec({"name": "t"})
    with pytest.raises(ConfigError, match="exactly one"):
        build_spec({"name": "t", "teacher": {"checkpoint": "a.pt", "train": {"epochs": 1}}})
    with pytest.raises(ConfigError, match="'teacher' section"):
        build_spec({**MINIMAL, "train": {"teacher_checkpoint": "x.pt"}})


def test_trained_teacher_path_is_keyed_by_recipe_and_cache(tmp_path):
    raw = {"name": "t", "teacher": {"train": {"epochs": 1}}, "train": {"cache_dir": str(tmp_path)}}
    first = build_spec(raw).train.teacher_checkpoint
    assert first.startswith(str(tmp_path / "teacher")) and first.endswith("tensors.pt")
    assert build_spec(raw).train.teacher_checkpoint == first
    assert build_spec(apply_overrides(raw, {"teacher.train.epochs": 2})).train.teacher_checkpoint != first


def test_relative_paths_resolve_against_cwd(tmp_path):
    spec = build_spec({**MINIMAL, "train": {"data": {"dataset": "folder", "data_dir": "../data"}}}, cwd=tmp_path / "x")
    assert spec.train.data.data_dir == str(tmp_path / "data")
    assert spec.teacher.checkpoint == str(tmp_path / "x" / "teacher.pt")
    assert spec.source["teacher"]["checkpoint"] == spec.teacher.checkpoint  # stored for workers: absolute


def test_tpe_ranges_are_validated():
    spec = build_spec({**MINIMAL, "tpe": {"trials": 5, "alpha": [0, 0.5], "student_drop": [3, 6]}})
    assert spec.tpe.alpha.high == 0.5 and spec.tpe.student_drop == (3, 6)
    with pytest.raises(ConfigError, match=r"tpe p range must lie in \[0, 1\]"):
        build_spec({**MINIMAL, "tpe": {"p": [0, 2]}})
    with pytest.raises(ConfigError, match="log range needs low > 0"):
        build_spec({**MINIMAL, "tpe": {"lr": {"low": 0, "high": 1, "log": True}}})
    with pytest.raises(ConfigError, match="pruner"):
        build_spec({**MINIMAL, "tpe": {"pruner": "sometimes"}})


def test_ablation_arms_are_looked_up_by_name():
    spec = build_spec({**MINIMAL, "ablation": {"extra_arms": ["ig_shuffled"]}})
    assert spec.ablation.all_arms == ("baseline", "kd", "ig", "kd_ig", "ig_shuffled")
    with pytest.raises(ConfigError, match=r"ablation arm must be one of \['baseline', 'kd', 'ig', 'kd_ig'"):
        build_spec({**MINIMAL, "ablation": {"arms": ["baseline", "distill"]}})
    with pytest.raises(ConfigError, match="must include 'baseline'"):
        build_spec({**MINIMAL, "ablation": {"arms": ["kd"]}})
    with pytest.raises(ConfigError, match=r"ablation alpha must be in \[0, 1\]"):
        build_spec({**MINIMAL, "ablation": {"alpha": 2}})
    methods = build_spec({**MINIMAL, "ablation": {"extra_arms": ["kd_grad_cam", "grad_cam_shuffled"]}})
    assert methods.ablation.all_arms[-2:] == ("kd_grad_cam", "grad_cam_shuffled")
    with pytest.raises(ConfigError, match=r"ablation agreement_method must be one of \['integrated_gradients', "):
        build_spec({**MINIMAL, "ablation": {"agreement_method": "lime"}})


def test_with_params_sets_the_search_parameters():
    base = build_spec(MINIMAL).train
    config = with_params(base, {"t": 4.0, "alpha": 0.3, "p": 0.2, "lr": 0.01, "student_drop": 3})
    assert (config.kd.temperature, config.kd.alpha, config.overlay.p) == (4.0, 0.3, 0.2)
    assert config.optim.lr == 0.01 and config.student.drop_blocks == 3
    assert config.data == base.data


def test_latency_settings_are_validated():
    with pytest.raises(ConfigError, match="repeats"):
        build_spec({**MINIMAL, "latency": {"repeats": 0}})
    assert build_spec({**MINIMAL, "latency": {"batch_sizes": [1, 4]}}).latency.batch_sizes == (1, 4)


def test_spec_source_round_trips(tmp_path):
    spec = load_study(SMOKE)
    again = build_spec(spec.source, cwd=Path("/elsewhere"))
    assert to_dict(again.train) == to_dict(spec.train) and again.grid == spec.grid


# --- how values are read: numbers, duplicate keys, text, names (issue 31) ----------------------------------

FLOATS = {"1e-3": 1e-3, "1E-3": 1e-3, ".5": 0.5, "5.": 5.0, "-1e+2": -100.0, "+.5": 0.5, "2.5e-4": 2.5e-4}


@pytest.mark.parametrize(("text", "number"), FLOATS.items())
def test_every_float_spelling_is_a_number_in_yaml_toml_and_set(text, number, tmp_path):
    (tmp_path / "s.yaml").write_text(f"name: s\nvalue: {text}\nvalues: [{text}, 1]\n")
    assert read_study_file(tmp_path / "s.yaml") == {"name": "s", "value": number, "values": [number, 1]}
    assert parse_value(text) == number and parse_value(f"[{text}, 1]") == [number, 1]
    if not text.startswith((".", "+")) and not text.endswith("."):  # what TOML itself accepts
        (tmp_path / "s.toml").write_text(f"value = {text}\n")
        assert read_study_file(tmp_path / "s.toml")["value"] == number


def test_a_learning_rate_written_1e_3_is_the_papers_in_a_file_and_in_set(tmp_path):
    (tmp_path / "s.yaml").write_text("teacher: {checkpoint: t.pt}\ntrain: {optim: {lr: 1e-3}}\n")
    assert load_study(tmp_path / "s.yaml").train.optim.lr == 0.001
    assert load_study(tmp_path / "s.yaml", {"train.optim.lr": parse_value("5E-4")}).train.optim.lr == 0.0005


def test_text_that_only_looks_numeric_stays_text():
    texts = ["1e", "e3", "1.2.3", "1e-3", "cpu"]
    assert [parse_value(text) for text in ["1e", "e3", "1.2.3", "'1e-3'", "cpu"]] == texts
    assert parse_value("3") == 3 and type(parse_value("3")) is int


@pytest.mark.parametrize("suffix", ["yaml", "toml"])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_an_infinite_or_nan_value_is_refused_with_its_key(tmp_path, value, suffix):
    toml_value = {".inf": "inf", "-.inf": "-inf", ".nan": "nan"}[value]
    study = tmp_path / f"s.{suffix}"
    if suffix == "yaml":
        study.write_text(f"teacher: {{checkpoint: t.pt}}\ntrain: {{optim: {{lr: {value}}}}}\n")
    else:
        study.write_text(f'[teacher]\ncheckpoint = "t.pt"\n[train.optim]\nlr = {toml_value}\n')
    with pytest.raises(ConfigError, match="^train.optim.lr must be a finite number but got"):
        load_study(study)
    with pytest.raises(ConfigError, match=r"^grid.t must be a finite number but got inf"):
        build_spec(apply_overrides(MINIMAL, {"grid.t": [1.0, parse_value(".inf")]}))


def test_a_yaml_key_written_twice_is_refused_and_named(tmp_path):
    study = tmp_path / "twice.yaml"
    study.write_text("teacher: {checkpoint: t.pt}\ngrid: {t: [1]}\ntrain: {epochs: 1}\ngrid: {t: [2]}\n")
    with pytest.raises(ConfigError, match=r"twice.yaml is not valid YAML: found key 'grid' twice \(line 4, column 1\)"):
        read_study_file(study)
    with pytest.raises(ConfigError, match="found key 't' twice"):
        parse_value("{t: 1, t: 2}")
    study.write_text("base: &base {epochs: 1, batch_size: 8}\ntrain: {<<: *base, epochs: 2}\n")
    assert read_study_file(study)["train"] == {"epochs": 2, "batch_size": 8}  # a merge key may be overridden


def test_a_study_file_that_is_not_utf8_is_one_line(tmp_path):
    study = tmp_path / "latin1.yaml"
    study.write_bytes("name: s\n# étude\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text: byte 0xe9 on line 2$"):
        read_study_file(study)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"tpe": {"t": [5, 1]}}, r"^tpe t: range low must be <= high but got \[5.0, 1.0\]"),
        ({"tpe": {"lr": {"low": 0, "high": 1, "log": True}}}, "^tpe lr: a log range needs low > 0 but got 0"),
        ({"tpe": {"t": {"low": "x", "high": 2}}}, "^tpe t: low must be a number but got 'x'"),
        ({"pareto": {"alpha": [0.9, 0.1]}}, r"^pareto alpha: range low must be <= high but got \[0.9, 0.1\]"),
    ],
)
def test_a_range_error_names_its_key(section, message):
    with pytest.raises(ConfigError, match=message):
        build_spec({**MINIMAL, **section})


@pytest.mark.parametrize("name", ["étude", "研究-1", "smoke_2.b"])
def test_a_unicode_study_name_is_accepted_in_a_file_and_as_study_name(name):
    check_study_name(name)
    assert build_spec({**MINIMAL, "name": name}).name == name


@pytest.mark.parametrize(("name", "message"), [("a b", "must be a plain name"), ("é" * 101, "is 202 bytes long")])
def test_a_study_name_is_refused_alike_in_a_file_and_as_study_name(name, message):
    with pytest.raises(ConfigError, match=message):
        check_study_name(name)
    with pytest.raises(ConfigError, match=message):
        build_spec({**MINIMAL, "name": name})


@pytest.mark.parametrize("path", sorted((REPO / "studies").glob("*.yaml")), ids=lambda path: path.name)
def test_every_committed_study_file_loads(path):
    spec = load_study(path)
    assert spec.name and spec.train.epochs >= 1


def test_the_demo_draws_only_the_overlaid_maps_and_starts_students_from_the_teacher():
    spec = load_study(REPO / "studies" / "demo.yaml")
    assert spec.train.overlay.maps == "drawn" and spec.train.student_init == "teacher"
    assert spec.ablation.arms == ("baseline", "kd", "kd_ig") and spec.pareto.trials == len(spec.pareto.enqueue)
    # Only what the demo shows is timed: ONNX Runtime fp32 at batch 1 (no int8 quantisation, no batch 128).
    assert spec.latency.onnx_runtimes == ("onnx-fp32",) and spec.latency.batch_sizes == (1,)
    assert {"student_drop": 5, "width": 1.0, "prune_ratio": 0.0} in spec.pareto.enqueue  # the paper's student
