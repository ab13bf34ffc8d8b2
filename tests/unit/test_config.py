import json

import pytest

from vr import config
from vr.errors import ConfigError
from vr.paths import Paths


def test_missing_config_file_gives_isolated_router_defaults(paths: Paths) -> None:
    cfg = config.load(paths)
    assert (cfg.control_device, cfg.metadata_port, cfg.password_port) == ("eth1", 80, 8080)


def test_config_reads_guest_networks_and_ports(paths: Paths) -> None:
    paths.config.write_text(
        json.dumps(
            {
                "metadata_port": 8081,
                "guest_networks": [
                    {"device": "eth0", "router_guest_ip": "10.1.1.1", "cidr": "10.1.1.0/24"}
                ],
            }
        )
    )
    cfg = config.load(paths)
    assert cfg.metadata_port == 8081
    assert [str(n.router_guest_ip) for n in cfg.guest_networks] == ["10.1.1.1"]


def test_config_with_unknown_key_names_it(paths: Paths) -> None:
    paths.config.write_text(json.dumps({"metdata_port": 80}))
    with pytest.raises(ConfigError, match="metdata_port"):
        config.load(paths)


def test_config_with_wrong_type_names_value_and_type(paths: Paths) -> None:
    paths.config.write_text(json.dumps({"metadata_port": "80"}))
    with pytest.raises(ConfigError, match="metadata_port='80': expected int"):
        config.load(paths)


@pytest.mark.parametrize("listen", ["::", "fe80::1", "eth1", ""])
def test_ssh_listen_must_be_an_ipv4_address(paths: Paths, listen: str) -> None:
    paths.config.write_text(json.dumps({"ssh_listen": listen}))
    with pytest.raises(ConfigError, match=r"ssh_listen=.*expected an IPv4 address"):
        config.load(paths)


def test_vr_up_probes_the_agent_where_it_listens(paths: Paths) -> None:
    from vr.supervisor import services_for

    paths.config.write_text(json.dumps({"ssh_listen": "169.254.10.10"}))
    agent = next(s for s in services_for(paths, config.load(paths)) if s.name == "agent")
    assert agent.host == "169.254.10.10"
    default = next(s for s in services_for(paths, config.Config()) if s.name == "agent")
    assert default.host == "127.0.0.1"


@pytest.mark.parametrize("device,role", [("eth1", "control"), ("eth2", "public")])
def test_configured_guest_network_on_control_or_public_device_is_refused(
    paths: Paths, device: str, role: str
) -> None:
    net = {"device": device, "router_guest_ip": "10.1.1.1", "cidr": "10.1.1.0/24"}
    paths.config.write_text(json.dumps({"guest_networks": [net]}))
    with pytest.raises(ConfigError, match=rf"device='{device}' is the {role} interface"):
        config.load(paths)


def test_a_guest_network_may_use_a_device_freed_from_the_public_role(paths: Paths) -> None:
    net = {"device": "eth2", "router_guest_ip": "10.1.1.1", "cidr": "10.1.1.0/24"}
    paths.config.write_text(json.dumps({"public_devices": ["eth3"], "guest_networks": [net]}))
    assert [n.device for n in config.load(paths).guest_networks] == ["eth2"]


@pytest.mark.parametrize("value", [0, 1023, 32 * 1024 * 1024 + 1])
def test_userdata_limit_outside_its_range_names_value_and_range(paths: Paths, value: int) -> None:
    paths.config.write_text(json.dumps({"userdata_max_bytes": value}))
    with pytest.raises(ConfigError, match=rf"userdata_max_bytes={value}: expected .* 1024 to"):
        config.load(paths)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("ssh_port", 99999, "a TCP port from 1 to 65535"),
        ("ssh_port", 0, "a TCP port from 1 to 65535"),
        ("metadata_port", 0, "a TCP port from 1 to 65535"),
        ("password_port", 65536, "a TCP port from 1 to 65535"),
        ("metadata_workers", -3, "a number of worker processes from 1 to 64"),
        ("metadata_workers", 0, "a number of worker processes from 1 to 64"),
        ("password_workers", 65, "a number of worker processes from 1 to 64"),
        ("imds_hop_limit", 0, "a hop limit (EC2's bounds) from 1 to 64"),
        ("imds_hop_limit", 65, "a hop limit (EC2's bounds) from 1 to 64"),
        ("imds_rate_burst", 0, "a number of requests from 1 to 1000000"),
        ("imds_waiters_per_vm", 0, "a number of held requests from 1 to 1024"),
    ],
)
def test_a_number_outside_its_range_is_refused_naming_key_value_and_range(
    paths: Paths, key: str, value: int, expected: str
) -> None:
    paths.config.write_text(json.dumps({key: value}))
    with pytest.raises(ConfigError) as exc:
        config.load(paths)
    assert f"{key}={value}: expected {expected}" in str(exc.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [("ssh_port", 1), ("ssh_port", 65535), ("metadata_workers", 1), ("password_workers", 64)],
)
def test_the_ends_of_each_range_are_accepted(paths: Paths, key: str, value: int) -> None:
    paths.config.write_text(json.dumps({key: value}))
    assert getattr(config.load(paths), key) == value


def test_a_boolean_is_not_taken_for_a_number(paths: Paths) -> None:
    paths.config.write_text(json.dumps({"metadata_workers": True}))
    with pytest.raises(ConfigError, match="metadata_workers=True: expected int"):
        config.load(paths)


def test_two_services_on_one_port_are_refused(paths: Paths) -> None:
    paths.config.write_text(json.dumps({"metadata_port": 8080}))
    with pytest.raises(ConfigError, match="expected 4 different ports"):
        config.load(paths)


def test_the_metrics_port_must_differ_from_the_service_ports(paths: Paths) -> None:
    paths.config.write_text(json.dumps({"metrics_port": 3922}))
    with pytest.raises(ConfigError, match="metrics_port=3922: expected 4 different ports"):
        config.load(paths)


def test_the_metrics_port_is_range_checked(paths: Paths) -> None:
    paths.config.write_text(json.dumps({"metrics_port": 70000}))
    with pytest.raises(ConfigError, match="metrics_port=70000: expected a TCP port"):
        config.load(paths)


def test_config_with_a_key_twice_names_it_instead_of_keeping_the_last(paths: Paths) -> None:
    paths.config.write_text('{"metadata_port": 80, "metadata_port": 8081}')
    with pytest.raises(ConfigError, match="JSON key='metadata_port': expected each key at most"):
        config.load(paths)


def test_vms_requiring_tokens_are_ipv4_addresses(paths: Paths) -> None:
    paths.config.write_text(json.dumps({"imds_tokens_required_vms": ["10.1.1.5", "vm-a"]}))
    with pytest.raises(ConfigError, match="imds_tokens_required_vms: 'vm-a': expected an IPv4"):
        config.load(paths)
    paths.config.write_text(json.dumps({"imds_tokens_required_vms": ["10.1.1.5"]}))
    assert config.load(paths).imds_tokens_required_vms == ("10.1.1.5",)
