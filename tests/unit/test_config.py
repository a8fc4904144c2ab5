from pathlib import Path

import pytest

from align.config import Config, ConfigError, load_config, parse_override
from align.method.pairing import candidates_needed

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_defaults_live_in_the_typed_config():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.world.num_images == Config.model_fields["world"].default.num_images


JOB_CONFIGS = [p for p in CONFIGS if "\napplications:" not in p.read_text()]


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=[p.name for p in JOB_CONFIGS])
def test_every_job_yaml_in_configs_validates(path):
    """Job configs against Config (Serve configs: tests/serve)."""
    text = path.read_text()
    assert text.startswith("#"), f"{path.name} must open with a comment: what it runs, how"
    assert "python -m pipelines." in text.split("\n\n")[0]
    load_config(path)


def test_dotted_overrides_apply_in_order_with_yaml_types(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("world:\n  seed: 1\n")
    cfg = load_config(
        cfg_file, ["world.seed=7", "world.caption_quality_share=0.5", "model.pretrained=null"]
    )
    assert cfg.world.seed == 7
    assert cfg.world.caption_quality_share == 0.5
    assert cfg.model.pretrained is None


def test_unknown_key_names_it_and_the_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["world.sed=3"])
    msg = str(e.value)
    assert "world.sed" in msg and "seed" in msg and "num_images" in msg
    assert "\n" not in msg


def test_unknown_key_in_the_file_is_an_error_too(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("world:\n  num_imgs: 3\n")
    with pytest.raises(ConfigError, match=r"world\.num_imgs.*valid keys under world"):
        load_config(cfg_file)


def test_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match=r"unknown config key 'wrold'"):
        load_config(None, ["wrold.seed=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"world\.num_images.*integer.*'many'"):
        load_config(None, ["world.num_images=many"])


def test_value_out_of_range_names_the_key():
    with pytest.raises(ConfigError, match=r"world\.caption_quality_share"):
        load_config(None, ["world.caption_quality_share=1.5"])


def test_value_cannot_be_used_as_a_section():
    with pytest.raises(ConfigError, match=r"'world\.seed' is a value, not a section"):
        load_config(None, ["world.seed.x=3"])


def test_keyed_sections_take_any_name_and_check_inside():
    cfg = load_config(None, ["index_corpus.scorers.laion_mlp.weight=2"])
    assert cfg.index_corpus.scorers["laion_mlp"].weight == 2.0
    with pytest.raises(ConfigError, match=r"scorers\.lowlevel\.wieght.*weight, checkpoint"):
        load_config(None, ["index_corpus.scorers.lowlevel.wieght=2"])


def test_baseline_systems_are_checked_when_the_config_loads():
    cfg = load_config(REPO / "configs/demo.yaml")
    assert cfg.evaluate.systems["rerank"].rerank.depth >= cfg.evaluate.k
    assert cfg.evaluate.systems["steer"].steer.weight > 0
    with pytest.raises(ConfigError, match=r"systems\.rerank\.rerank\.depth \(3\) is under k"):
        load_config(REPO / "configs/demo.yaml", ["evaluate.systems.rerank.rerank.depth=3"])
    with pytest.raises(ConfigError, match=r"top_share"):
        load_config(REPO / "configs/demo.yaml", ["evaluate.systems.steer.steer.top_share=0"])
    with pytest.raises(ConfigError, match=r"retrieve_with"):
        load_config(None, ["build_preferences.retrieve_with=both"])


def test_top_k_must_cover_the_grid_naming_both_settings():
    cfg = load_config(REPO / "configs/demo.yaml")
    g = cfg.build_preferences.grid
    need = candidates_needed(g.u, g.v, g.stride)
    assert cfg.build_preferences.top_k >= need
    message = (
        rf"config section 'build_preferences': top_k \({need - 1}\) is under the {need} candidates "
        rf"that grid {g.u} x {g.v} with stride {g.stride} reads"
    )
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs/demo.yaml", [f"build_preferences.top_k={need - 1}"])
    # Shrinking the grid instead is the other way out (the tests' 32-candidate worlds take it).
    small = load_config(
        REPO / "configs/demo.yaml", ["build_preferences.top_k=32", "build_preferences.grid.v=4"]
    )
    assert small.build_preferences.top_k == 32


def test_section_cannot_be_overwritten_by_a_value():
    with pytest.raises(ConfigError, match="world"):
        load_config(None, ["world=3"])


@pytest.mark.parametrize("bad", ["world.seed", "=3", ""])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="key=value"):
        parse_override(bad)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("world: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_job_outputs_are_absolute_for_local_paths_and_kept_for_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(None, ["output_dir=out"]).job_output("world") == f"{tmp_path}/out/world"
    uri = load_config(None, ["output_dir=s3://b/run/", "evaluate.output=s3://c/eval/"])
    assert uri.job_output("world") == "s3://b/run/world"
    assert uri.job_output("evaluate") == "s3://c/eval"


def test_a_pretrain_section_keeps_its_own_output_and_objective(tmp_path):
    """A file's `pretrain:` section replaces the default section: what it leaves out must still
    be pretrain's (its own output folder), never the finetune job's."""
    path = tmp_path / "c.yaml"
    path.write_text("pretrain:\n  max_steps: 7\n")
    cfg = load_config(path)
    assert cfg.pretrain.output == "{output_dir}/pretrain" != cfg.finetune.output
    assert cfg.pretrain.objective == "contrastive" and cfg.pretrain.max_steps == 7
    assert load_config(REPO / "configs/demo.yaml").pretrain.output == cfg.pretrain.output
