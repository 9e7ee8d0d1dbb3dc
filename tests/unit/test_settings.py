import pytest

from onpolicy.settings import ConfigError, ServiceSettings, load_settings


class DemoSettings(ServiceSettings):
    service = "demo"
    concurrency: int = 4


def test_defaults():
    s = load_settings(DemoSettings)
    assert s.topics.name("prompts") == "onpolicy.prompts"
    assert s.kafka.client_config()["bootstrap_servers"] == ["127.0.0.1:9092"]


def test_service_env_beats_shared_env_beats_yaml(monkeypatch, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "kafka:\n  bootstrap_servers: yaml:1\ntopics:\n  prefix: y.\n"
        "demo:\n  concurrency: 7\nother:\n  concurrency: 99\n"
    )
    s = load_settings(DemoSettings, config_file=cfg)
    assert (s.kafka.bootstrap_servers, s.topics.prefix, s.concurrency) == ("yaml:1", "y.", 7)
    monkeypatch.setenv("ONPOLICY_KAFKA__BOOTSTRAP_SERVERS", "shared:1")
    assert load_settings(DemoSettings, config_file=cfg).kafka.bootstrap_servers == "shared:1"
    monkeypatch.setenv("ONPOLICY_DEMO_KAFKA__BOOTSTRAP_SERVERS", "mine:1")
    monkeypatch.setenv("ONPOLICY_DEMO_CONCURRENCY", "9")
    s = load_settings(DemoSettings, config_file=cfg)
    assert (s.kafka.bootstrap_servers, s.concurrency) == ("mine:1", 9)


def test_config_file_from_environment(monkeypatch, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("demo:\n  concurrency: 3\n")
    monkeypatch.setenv("ONPOLICY_CONFIG", str(cfg))
    assert load_settings(DemoSettings).concurrency == 3


def test_bad_values_name_the_field_and_variable(monkeypatch):
    monkeypatch.setenv("ONPOLICY_DEMO_CONCURRENCY", "many")
    monkeypatch.setenv("ONPOLICY_KAFKA__SECURITY_PROTOCOL", "PIGEON")
    with pytest.raises(ConfigError) as err:
        load_settings(DemoSettings)
    text = str(err.value)
    assert "concurrency" in text and "ONPOLICY_DEMO_CONCURRENCY" in text and "'many'" in text
    assert "kafka.security_protocol" in text and "ONPOLICY_KAFKA__SECURITY_PROTOCOL" in text


def test_unknown_yaml_key_is_an_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("demo:\n  concurency: 3\n")
    with pytest.raises(ConfigError, match="concurency"):
        load_settings(DemoSettings, config_file=cfg)


def test_unreadable_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("demo: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(DemoSettings, config_file=cfg)


def test_sasl_ssl_passes_through():
    s = load_settings(
        DemoSettings,
        kafka={
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "u",
            "sasl_password": "p",
            "ssl_cafile": "/etc/ca.pem",
        },
    )
    cfg = s.kafka.client_config()
    assert cfg["sasl_mechanism"] == "SCRAM-SHA-512"
    assert cfg["sasl_plain_username"] == "u" and cfg["sasl_plain_password"] == "p"
    assert cfg["ssl_cafile"] == "/etc/ca.pem"
    assert "p" not in repr(s.kafka.sasl_password)
