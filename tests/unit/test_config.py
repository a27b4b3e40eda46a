"""The typed config tree: precedence, validation, flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pdserve.cli import serve as serve_cli
from pdserve.shared.config import ServeConfig, env_overrides
from pdserve.shared.errors import ConfigError


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_are_the_embedded_deployment(monkeypatch):
    for var in ("PDSERVE_MODEL", "PDSERVE_API_KEY", "PDSERVE_HOST", "PDSERVE_PORT", "PDSERVE_RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    config = ServeConfig.load()
    assert config.engine.model.endswith("demo_model")
    assert config.engine.model_name == "demo_model"
    assert (config.pools.mixed.instances, config.pools.prefill.instances, config.pools.decode.instances) == (0, 1, 1)
    assert (config.gateway.host, config.gateway.port) == ("127.0.0.1", 8000)
    assert config.ray.address is None and config.gateway.api_key is None


def test_precedence_file_env_flags(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("gateway: {port: 9000, host: 0.0.0.0}\nengine: {max_model_len: 512}\n")
    monkeypatch.setenv("PDSERVE_PORT", "9100")
    config = ServeConfig.load(path, serve_cli.flag_overrides(_parse("--max-model-len", "256")))
    assert config.gateway.port == 9100  # env beats file
    assert config.gateway.host == "0.0.0.0"  # file beats default
    assert config.engine.max_model_len == 256  # flag beats file
    config = ServeConfig.load(path, serve_cli.flag_overrides(_parse("--port", "9200")))
    assert config.gateway.port == 9200  # flag beats env


def test_engine_args_pass_through_as_json():
    overrides = serve_cli.flag_overrides(_parse("--engine-arg", "max_logprobs=50", "--engine-arg", "tokenizer_mode=slow"))
    assert overrides["engine"]["engine_args"] == {"max_logprobs": 50, "tokenizer_mode": "slow"}
    with pytest.raises(ConfigError):
        serve_cli.flag_overrides(_parse("--engine-arg", "novalue"))


@pytest.mark.parametrize("yaml_text,fragment", [
    ("pools: {prefill: 0, decode: 0}", "at least one engine instance"),
    ("pools: {decode: 0}", "both prefill and decode"),
    ("gateway: {routing_policy: random}", "unknown routing policy"),
    ("gateway: {port: 70000}", "port"),
    ("engine: {unknown_field: 1}", "unknown_field"),
    ("- just a list", "mapping"),
    ("gateway: {port: [", "cannot read"),
])
def test_invalid_configs_are_refused_with_reasons(tmp_path, yaml_text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        ServeConfig.load(path)
    assert fragment in str(info.value)


def test_pool_flags_and_modes():
    config = ServeConfig.load(None, serve_cli.flag_overrides(_parse("--prefill", "1", "--decode", "2")))
    assert (config.pools.mixed.instances, config.pools.prefill.instances, config.pools.decode.instances) == (0, 1, 2)
    config = ServeConfig.load(None, serve_cli.flag_overrides(_parse("--mode", "colocated")))
    assert (config.pools.mixed.instances, config.pools.prefill.instances, config.pools.decode.instances) == (1, 0, 0)
    config = ServeConfig.load(None, serve_cli.flag_overrides(_parse("--mode", "colocated", "--mixed", "3")))
    assert (config.pools.mixed.instances, config.pools.prefill.instances, config.pools.decode.instances) == (3, 0, 0)
    with pytest.raises(ConfigError, match="colocated"):
        serve_cli.flag_overrides(_parse("--mode", "colocated", "--prefill", "2"))


def test_env_overrides_read_only_known_variables():
    env = {"PDSERVE_API_KEY": "k", "PDSERVE_MODEL": "/m", "UNRELATED": "x"}
    assert env_overrides(env) == {"gateway": {"api_key": "k"}, "engine": {"model": "/m"}}
    assert ServeConfig.load(None, env_overrides(env)).gateway.api_key.get_secret_value() == "k"


def test_serve_help_documents_every_option(capsys):
    from pdserve.cli.main import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--host", "--port", "--address", "--mode", "--mixed", "--prefill", "--decode", "--dtype",
                 "--max-model-len", "--kv-cache-memory-bytes", "--api-key", "--config", "--engine-arg"):
        assert flag in text


def test_core_bindings_are_disjoint_until_cores_run_out():
    from pdserve.worker.pool import core_bindings

    assert core_bindings(2, 1, [0, 1]) == ["0", "1"]  # one prefill, one decode: a core each
    assert core_bindings(2, 2, [0, 1, 2, 3, 4]) == ["0,1", "2,3"]
    assert core_bindings(3, 1, [4, 6]) == ["4", "6", "4"]  # too few: they wrap (and share, with a warning)
    assert core_bindings(1, 8, [0, 1]) == ["0,1"]  # no more than there are


# -- per-pool placement and engine settings (Splitwise's designs as YAML) -------------------------
SPLITWISE = Path(__file__).resolve().parents[2] / "deploy" / "splitwise"


@pytest.mark.parametrize("design,decode_resource", [("hh", "accelerator_type:H100"),
                                                    ("ha", "accelerator_type:A100"),
                                                    ("hhcap", "h100_capped")])
def test_the_splitwise_designs_validate_and_place_each_pool_on_its_own_machines(design, decode_resource):
    from pdserve.shared.config import engine_for
    from pdserve.shared.roles import Role
    from pdserve.worker.pool import actor_options

    config = ServeConfig.load(SPLITWISE / f"{design}.yaml")
    assert actor_options(config.pools, Role.PREFILL)["resources"] == {"accelerator_type:H100": 0.001}
    assert actor_options(config.pools, Role.DECODE)["resources"] == {decode_resource: 0.001}
    assert actor_options(config.pools, Role.DECODE)["num_gpus"] == 8
    prefill = engine_for(config.engine, config.pools.prefill)
    decode = engine_for(config.engine, config.pools.decode)
    assert prefill.tensor_parallel_size == decode.tensor_parallel_size == 8
    assert prefill.max_num_seqs == 16 and decode.max_num_seqs == 256
    assert prefill.model == decode.model and prefill.block_size == decode.block_size == 16
    assert config.kv_transfer.port_range == (20000, 20999)


def test_a_count_from_the_command_line_keeps_the_files_pool_settings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pools:\n  decode: {instances: 1, resources: {b: 1}, engine: {max_num_seqs: 8}}\n")
    config = ServeConfig.load(path, {"pools": {"decode": 3}})
    assert config.pools.decode.instances == 3 and config.pools.decode.resources == {"b": 1.0}
    assert config.pools.decode.engine.max_num_seqs == 8


@pytest.mark.parametrize("pools,message", [
    ({"prefill": {"instances": 1, "engine": {"tensor_parallel_size": 2}}}, "tensor_parallel_size 2 differs"),
    ({"decode": {"instances": 1, "engine": {"engine_args": {"block_size": 32}}}}, "must be the same on every pool"),
    ({"gpus_per_instance": 1, "prefill": {"instances": 1, "engine": {"tensor_parallel_size": 2}},
      "decode": {"instances": 1, "engine": {"tensor_parallel_size": 2}}}, "cannot hold tensor_parallel_size 2"),
])
def test_cross_pool_rules_fail_at_load_with_a_clear_message(pools, message):
    with pytest.raises(ConfigError, match=message):
        ServeConfig.load(None, {"pools": pools})


def test_engines_that_disagree_on_the_block_size_stop_the_start_up():
    from pdserve.launcher import check_pools_agree
    from pdserve.shared.protocol import EngineInfo
    from pdserve.shared.roles import Role

    p = EngineInfo("prefill-0", Role.PREFILL, "m", max_model_len=4096, block_size=16, kv_blocks_total=10)
    d = EngineInfo("decode-0", Role.DECODE, "m", max_model_len=4096, block_size=32, kv_blocks_total=10)
    check_pools_agree([p, p])
    with pytest.raises(ConfigError, match="block_size differs between pools: 16 on prefill-0, 32 on decode-0"):
        check_pools_agree([p, d])


def test_the_config_knows_the_router_s_policies_without_importing_it():
    import subprocess
    import sys

    from pdserve.router.registry import POLICIES
    from pdserve.shared.config import POLICY_NAMES

    assert set(POLICY_NAMES) == set(POLICIES)
    code = ("import sys; from pdserve.shared.config import ServeConfig; "
            "ServeConfig.model_validate({'gateway': {'routing_policy': 'kv_jsq'}}); "
            "print(sorted(m for m in sys.modules if m.startswith('pdserve.router')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
