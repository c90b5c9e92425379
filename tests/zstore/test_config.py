import pytest

from zstore.config import ConfigError, load, read_secret_file


def test_file_env_and_overrides_in_order(tmp_path):
    f = tmp_path / "z.toml"
    f.write_text('[etcd]\nendpoints = ["10.0.0.1:2379"]\nprefix = "/a"\n'
                 '[meta]\nlease_ttl = 7\ntoken_file = "token"\n[chunk]\nlabels = {zone = "a"}\n')
    cfg = load(f, env={"ZSTORE_ETCD_PREFIX": "/b", "ZSTORE_CHUNK_DATA_PORT": "9000"},
               overrides={"meta.lease_ttl": 3, "meta.listen": None})
    assert cfg.etcd.endpoints == ["10.0.0.1:2379"]
    assert cfg.etcd.prefix == "/b"                      # env over file
    assert cfg.meta.lease_ttl == 3                       # flag over file
    assert cfg.meta.listen == "127.0.0.1:7490"           # unset flag keeps the default
    assert cfg.chunk.data_port == 9000 and cfg.chunk.labels == {"zone": "a"}
    assert cfg.meta.token_file == str(tmp_path / "token")  # relative to the config file


@pytest.mark.parametrize("text,msg", [
    ("[etcd]\ntimeout = 'soon'\n", "not a valid float"),
    ("[nope]\nx = 1\n", "unknown config section"),
    ("[etcd]\nbogus = 1\n", "unknown config key etcd.bogus"),
    ("[etcd\n", "not valid TOML"),
])
def test_bad_config_says_what_is_wrong(tmp_path, text, msg):
    f = tmp_path / "z.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=msg):
        load(f, env={})


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "missing.toml", env={})


def test_env_lists_and_maps():
    cfg = load(None, env={"ZSTORE_ETCD_ENDPOINTS": "a:1, b:2", "ZSTORE_CHUNK_LABELS": "zone=a,rack=r1",
                          "ZSTORE_STATE_DIR": "/ignored"})
    assert cfg.etcd.endpoints == ["a:1", "b:2"] and cfg.chunk.labels == {"zone": "a", "rack": "r1"}


def test_secret_file(tmp_path):
    (tmp_path / "t").write_text("abc\n")
    assert read_secret_file(str(tmp_path / "t"), "token") == "abc"
    (tmp_path / "e").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_secret_file(str(tmp_path / "e"), "token")
    with pytest.raises(ConfigError, match="cannot read token"):
        read_secret_file(str(tmp_path / "missing"), "token")


def test_shipped_example_config_loads():
    from pathlib import Path
    cfg = load(Path(__file__).resolve().parents[2] / "deploy" / "zstore.toml.example", env={})
    assert cfg.chunk.labels == {"zone": "z1", "rack": "r3"} and len(cfg.etcd.endpoints) == 3
