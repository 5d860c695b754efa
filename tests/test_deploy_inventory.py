"""Deployment inventory: CloudLab manifest / hosts file -> cluster config -> hosts, the checks and the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from block.deploy.inventory import (
    ROLES,
    Host,
    InventoryError,
    cluster_config,
    engine_slots,
    hosts_from_config,
    main,
    parse_hosts_file,
    parse_manifest,
    scheduler_hosts,
    validate_hosts,
    write_cluster_config,
)

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "tests" / "data" / "cloudlab_manifest.xml"

# No namespace (other rspec flavours must parse too), two links, mixed hardware, a node without <login>.
TWO_LAN_MANIFEST = """<rspec type="manifest">
  <node client_id="gpu0"><hardware_type name="d8545"/>
    <interface client_id="gpu0:if0"><ip address="10.10.1.1" type="ipv4"/></interface>
    <interface client_id="gpu0:if1"><ip address="10.20.1.1" type="ipv4"/></interface>
    <services><login authentication="ssh-keys" hostname="pc1.example.org" port="2222" username="carol"/></services>
  </node>
  <node client_id="cpu1"><hardware_type name="m510"/>
    <interface client_id="cpu1:if0"><ip address="10.10.1.2" type="ipv4"/></interface>
    <interface client_id="cpu1:if1"><ip address="10.20.1.2" type="ipv4"/></interface>
    <host name="cpu1.exp.example.org" ipv4="192.0.2.7"/>
  </node>
  <link client_id="ctrl"><interface_ref client_id="gpu0:if0"/><interface_ref client_id="cpu1:if0"/></link>
  <link client_id="data"><interface_ref client_id="gpu0:if1"/><interface_ref client_id="cpu1:if1"/></link>
</rspec>"""


# ------------------------------------------------------------------------------------------------------- manifest

def test_manifest_hosts_addresses_ips_hardware_roles():
    hosts = parse_manifest(MANIFEST.read_text())
    assert [h.name for h in hosts] == ["node0", "node1", "node2"]
    assert [h.address for h in hosts] == [f"amd0{n}.utah.cloudlab.us" for n in ("41", "57", "62")]
    assert [h.internal_ip for h in hosts] == ["10.10.1.1", "10.10.1.2", "10.10.1.3"]
    assert [h.ip for h in hosts] == ["10.10.1.1", "10.10.1.2", "10.10.1.3"]
    assert all(h.port == 22 and h.hardware == "d7525" and h.gpu == "yes" and h.instances == 1 for h in hosts)
    assert [h.roles for h in hosts] == [["engine", "scheduler"], ["engine"], ["engine"]]
    assert scheduler_hosts(hosts) == [hosts[0]]
    # no user given: the first login (alice) and its username are kept
    assert {h.user for h in hosts} == {"alice"}
    assert hosts[0].ssh_target == "alice@amd041.utah.cloudlab.us:22"


def test_manifest_user_picks_the_login():
    hosts = parse_manifest(MANIFEST.read_text(), user="bob")
    assert [h.user for h in hosts] == ["bob"] * 3
    assert hosts[2].ssh_target == "bob@amd062.utah.cloudlab.us:22"


def test_manifest_unknown_user_names_node_and_users():
    with pytest.raises(InventoryError, match=r"node0.*'mallory'.*'alice', 'bob'"):
        parse_manifest(MANIFEST.read_text(), user="mallory")


def test_manifest_lan_selection_hardware_table_and_host_fallback():
    first = parse_manifest(TWO_LAN_MANIFEST)
    assert [h.internal_ip for h in first] == ["10.10.1.1", "10.10.1.2"]  # first interface by default
    data = parse_manifest(TWO_LAN_MANIFEST, lan="data")
    assert [h.internal_ip for h in data] == ["10.20.1.1", "10.20.1.2"]
    gpu0, cpu1 = data
    assert (gpu0.address, gpu0.port, gpu0.user) == ("pc1.example.org", 2222, "carol")
    assert (gpu0.hardware, gpu0.gpu, gpu0.instances) == ("d8545", "yes", 4)  # 4x A100 per d8545
    assert (cpu1.address, cpu1.user, cpu1.gpu, cpu1.instances) == ("cpu1.exp.example.org", None, "auto", 1)
    # a user given for a node without logins is used as is
    assert parse_manifest(TWO_LAN_MANIFEST, user="carol")[1].user == "carol"
    with pytest.raises(InventoryError, match=r"no link 'nope'.*'ctrl', 'data'"):
        parse_manifest(TWO_LAN_MANIFEST, lan="nope")


def test_manifest_node_not_on_the_lan():
    xml = TWO_LAN_MANIFEST.replace('<interface_ref client_id="cpu1:if1"/>', "")
    with pytest.raises(InventoryError, match=r"'cpu1' has no interface with an IP on link 'data'"):
        parse_manifest(xml, lan="data")


@pytest.mark.parametrize("xml, pattern", [
    ("<rspec><node client_id='a'>", r"not valid XML: .*line 1"),
    ("<html><body>Login required</body></html>", r"no <node> elements"),
    ("<rspec><node client_id='n7'><hardware_type name='d7525'/></node></rspec>", r"node 'n7' has no address"),
])
def test_manifest_errors(xml, pattern):
    with pytest.raises(InventoryError, match=pattern):
        parse_manifest(xml)


# ----------------------------------------------------------------------------------------------------- hosts file

HOSTS = """\
# Block's block/config/hosts, with options
alice@amd041.utah.cloudlab.us          ip=10.10.1.1   # scheduler + engine
alice@amd057.utah.cloudlab.us:2200     ip=10.10.1.2 instances=2 gpu=no

10.0.0.9 name=spare port=2022 workdir=/scratch/block hardware=d8545
"""


def test_hosts_file_parsing():
    hosts = parse_hosts_file(HOSTS, source="hosts")
    assert [h.name for h in hosts] == ["node0", "node1", "spare"]
    assert [(h.user, h.address, h.port) for h in hosts] == [
        ("alice", "amd041.utah.cloudlab.us", 22), ("alice", "amd057.utah.cloudlab.us", 2200), (None, "10.0.0.9", 2022)]
    assert [h.ip for h in hosts] == ["10.10.1.1", "10.10.1.2", "10.0.0.9"]  # no ip=: the address
    assert [h.instances for h in hosts] == [1, 2, 4]  # d8545 defaults to 4 engines
    assert [h.gpu for h in hosts] == ["auto", "no", "yes"]
    assert hosts[2].workdir == "/scratch/block" and hosts[0].workdir == "~/block-deploy"
    assert [h.roles for h in hosts] == [["engine", "scheduler"], ["engine"], ["engine"]]
    assert parse_hosts_file("bob@h1\nh2", user="dave")[1].user == "dave"  # --user fills lines without user@
    h = parse_hosts_file("h0 service_ports=engine:9000,scheduler:9200")[0]
    assert h.service_ports == {"engine": 9000, "scheduler": 9200} and hosts[0].service_ports is None


def test_hosts_file_explicit_scheduler_rule():
    hosts = parse_hosts_file("h0\nh1 roles=engine,scheduler\nh2 roles=scheduler instances=0\nh3")
    assert [h.roles for h in hosts] == [["engine"], ["engine", "scheduler"], ["scheduler"], ["engine"]]
    assert [h.name for h in scheduler_hosts(hosts)] == ["node1", "node2"]
    # roles that leave out the scheduler do not stop the first host from getting it
    assert parse_hosts_file("h0\nh1 roles=engine")[0].roles == ["engine", "scheduler"]
    # a scheduler-only first host (instances=0) gets no engine role
    assert parse_hosts_file("h0 instances=0\nh1")[0].roles == ["scheduler"]


@pytest.mark.parametrize("text, pattern", [
    ("h0\n\nh1 gpus=yes", r"^hosts\.txt line 3: unknown key 'gpus' \(known: name, ip, instances,"),
    ("h0\nh1 instances=x", r"^hosts\.txt line 2: instances='x' is not an integer"),
    ("h0 instances=-1", r"^hosts\.txt line 1: instances=-1 must be >= 0"),
    ("# c\nh0:ssh", r"^hosts\.txt line 2: port='ssh' is not an integer"),
    ("h0:22 port=23", r"line 1: port given twice"),
    ("h0 roles=engine,gpu", r"line 1: roles: unknown role\(s\) 'gpu'"),
    ("h0 gpu=maybe", r"line 1: gpu='maybe' must be one of auto, yes, no"),
    ("h0 name=a name=b", r"line 1: key 'name' given twice"),
    ("h0 extra", r"line 1: expected key=value after the host, got 'extra'"),
    ("ip=1.2.3.4", r"line 1: expected \[user@\]address\[:port\] first"),
    ("@h0", r"line 1: '@h0' has an empty user"),
    ("# only comments\n\n", r"^hosts\.txt: no hosts"),
    ("h0 service_ports=gpu:1", r"line 1: service_ports: unknown service 'gpu'"),
    ("h0 service_ports=engine:70000", r"line 1: service_ports\.engine=70000 is not a TCP port"),
])
def test_hosts_file_errors(text, pattern):
    with pytest.raises(InventoryError, match=pattern):
        parse_hosts_file(text, source="hosts.txt")


# ------------------------------------------------------------------------------------------- control characters
# A newline in a work directory once split teardown's `pwd; echo $HOME` answer so that `rm -rf` was aimed at $HOME:
# every inventory source rejects control characters in every string, naming the line, node or key.

@pytest.mark.parametrize("char", ["\r", "\x00", "\x1b", "\x0b", "\x85", "\u2028", "\u202e"])
def test_hosts_file_rejects_control_characters_naming_the_line(char):
    text = f"h0\n# {char} in a comment is fine\nh1 workdir=/scratch/a{char}b ip=10.0.0.2\n"
    with pytest.raises(InventoryError, match=r"^hosts\.txt line 3: control character\(s\) " + re.escape(repr(char))):
        parse_hosts_file(text, source="hosts.txt")
    with pytest.raises(InventoryError, match=r"^hosts\.txt line 1: control character"):
        parse_hosts_file(f"h0 name=a{char}b", source="hosts.txt")


def test_hosts_file_newline_or_tab_in_a_workdir_cannot_make_it_home():
    # a newline ends the line, so what is left of the work directory is the home directory itself: refused
    with pytest.raises(InventoryError, match=r"^hosts\.txt line 1: workdir='~/' is / or the home directory"):
        parse_hosts_file("h0 workdir=~/\nfoo\n", source="hosts.txt")
    for workdir in ("/", "~", "~/.", ".", "~/x/../..", "//"):
        with pytest.raises(InventoryError, match=r"line 2: workdir=.* is / or the home directory or above it"):
            parse_hosts_file(f"h0\nh1 workdir={workdir}", source="hosts.txt")
    with pytest.raises(InventoryError, match=r"line 1: expected key=value after the host, got 'b'"):
        parse_hosts_file("h0 workdir=/a\tb", source="hosts.txt")  # tabs separate fields
    # Windows line ends stay fine
    assert [h.workdir for h in parse_hosts_file("h0 workdir=/w\r\nh1\r\n")] == ["/w", "~/block-deploy"]


@pytest.mark.parametrize("old, new, field, value", [
    ('username="alice"', 'username="alice&#10;x"', "user", "alice\nx"),
    ('hostname="amd041.utah.cloudlab.us"', 'hostname="amd041&#13;"', "address", "amd041\r"),
    ('address="10.10.1.1"', 'address="10.10.1.1&#9;"', "internal_ip", "10.10.1.1\t"),
    ('name="d7525"', 'name="d7525&#133;"', "hardware", "d7525\x85"),
])
def test_manifest_rejects_control_characters_naming_the_node(old, new, field, value):
    xml = MANIFEST.read_text()
    assert old in xml
    with pytest.raises(InventoryError, match=r"^manifest node 'node0': " + re.escape(f"{field}={value!r}")
                       + " contains control character"):
        parse_manifest(xml.replace(old, new, 1))
    # NUL cannot be written in XML at all: the parser names the place
    with pytest.raises(InventoryError, match=r"not valid XML: .*line \d+"):
        parse_manifest(xml.replace(old, old[:-1] + '&#0;"', 1))


def test_manifest_cli_workdir_with_control_characters(tmp_path, capsys):
    for workdir, why in (("~/a\nb", r"contains control character\(s\) '\\n'"), ("~/a\x00", "control character"),
                         ("~", "is / or the home directory")):
        assert main(["--manifest", str(MANIFEST), "--name", "x", "--workdir", workdir, "--print"]) == 2
        err = capsys.readouterr().err
        assert "--workdir=" in err and re.search(why, err), err


@pytest.mark.parametrize("key, value", [("workdir", "~/x\ny"), ("workdir", "/w\r"), ("workdir", "/w\x00"),
                                        ("address", "h\tx"), ("user", "u\n"), ("name", "a\u2029"),
                                        ("internal_ip", "10.0.0.1\n"), ("hardware", "d\x7f")])
def test_cluster_config_rejects_control_characters_naming_the_key(key, value):
    entry = Host("a", "a.example", roles=list(ROLES)).to_dict() | {key: value}
    with pytest.raises(InventoryError, match=rf"^cluster\.hosts\[0\]\.{key}=.* contains control character"):
        hosts_from_config({"name": "x", "hosts": [entry]})
    # hosts made in code go through the same check
    with pytest.raises(InventoryError, match=rf"host '.*': {key}=.* contains control character"):
        validate_hosts([Host(**entry)])
    with pytest.raises(InventoryError, match=r"cluster\.hosts\[0\]: workdir='~/\.\.' is / or the home directory"):
        hosts_from_config({"name": "x", "hosts": [entry | {key: "ok", "workdir": "~/.."}]})


# ---------------------------------------------------------------------------------------- config, round trip, checks

def test_cluster_config_counts_instances():
    hosts = parse_hosts_file("h0 instances=0\nh1 instances=4\nh2 instances=3")
    config = cluster_config(hosts, "lab", source="hosts")
    assert (config["name"], config["num_instances"], config["source"]) == ("lab", 7, "hosts")
    assert [d["name"] for d in config["hosts"]] == ["node0", "node1", "node2"]
    assert "source" not in cluster_config(hosts, "lab")


def test_round_trip_through_yaml(tmp_path):
    hosts = parse_manifest(MANIFEST.read_text(), user="bob") + parse_hosts_file(
        "carol@[2001:db8::5]:2201 name=v6 gpu=no workdir=/data/b instances=3")
    path = write_cluster_config(cluster_config(hosts, "rt", source="manifest.xml"), tmp_path / "sub" / "rt.yaml")
    text = path.read_text()
    assert text.startswith("# generated by python -m block.deploy.inventory from manifest.xml on ")
    assert text.splitlines()[0].endswith("; edit freely")
    assert sorted(p.name for p in path.parent.iterdir()) == ["rt.yaml"]  # no temporary left behind
    loaded = OmegaConf.load(path)
    assert loaded.num_instances == 6
    assert hosts_from_config(loaded) == hosts
    assert hosts_from_config(OmegaConf.to_container(loaded)) == hosts  # plain dicts work too
    assert hosts[-1].ssh_target == "carol@[2001:db8::5]:2201"


def test_hosts_from_config_errors():
    with pytest.raises(InventoryError, match=r"cluster=local4 has no hosts: mode=deploy needs .*block\.deploy\.inventory"):
        hosts_from_config(OmegaConf.create({"name": "local4", "num_instances": 4}))
    good = Host("a", "a.example").to_dict() | {"roles": ["engine", "scheduler"]}
    with pytest.raises(InventoryError, match=r"cluster\.hosts\[1\]: unknown key\(s\) 'gpus'"):
        hosts_from_config({"name": "x", "hosts": [good, {"name": "b", "address": "b", "gpus": 1}]})
    with pytest.raises(InventoryError, match=r"cluster\.hosts\[0\]: missing required key 'address'"):
        hosts_from_config({"name": "x", "hosts": [{"name": "b"}]})
    with pytest.raises(InventoryError, match=r"cluster\.hosts\[0\]\.instances=True is not an integer"):
        hosts_from_config({"name": "x", "hosts": [good | {"instances": True}]})
    with pytest.raises(InventoryError, match=r"no host has the scheduler role"):
        hosts_from_config({"name": "x", "hosts": [good | {"roles": ["engine"]}]})
    # an unquoted `gpu: yes` in a hand-edited YAML is a boolean: read back as "yes"
    hand = OmegaConf.create("name: x\nhosts:\n- {name: a, address: a, gpu: yes, roles: [engine, scheduler]}\n")
    assert hosts_from_config(hand)[0].gpu == "yes"


def test_validate_hosts_lists_every_problem():
    hosts = [Host("a", "h1", port=0, roles=["engine"], instances=0),
             Host("a", "h2", port=70000, roles=["scheduler"], instances=2),
             Host("c", "h3", roles=[], instances=0)]
    with pytest.raises(InventoryError) as e:
        validate_hosts(hosts)
    msg = str(e.value)
    for part in ["'a' is used 2 times", "port 0 is not in 1..65535", "port 70000 is not in 1..65535",
                 "'a' has the engine role but instances=0", "instances=2 but not the engine role",
                 "'c' has no roles", "no engine instances in total"]:
        assert part in msg, part
    assert "no host has the scheduler role" not in msg  # h2 is a scheduler
    with pytest.raises(InventoryError, match="no host has the scheduler role"):
        validate_hosts([Host("a", "h1")])
    validate_hosts([Host("a", "h1", roles=list(ROLES))])  # the smallest valid cluster


def test_engine_slots():
    hosts = [Host("s", "h0", instances=0, roles=["scheduler"]), Host("a", "h1", instances=2),
             Host("b", "h2", instances=3, roles=["engine", "scheduler"])]
    slots = engine_slots(hosts)
    assert [(h.name, i) for h, i in slots] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2)]
    assert [(h.name, i) for h, i in engine_slots(hosts, 3)] == [("a", 0), ("a", 1), ("b", 0)]
    with pytest.raises(InventoryError, match=r"^cluster\.num_instances=6 but the hosts have 5 engine slots$"):
        engine_slots(hosts, 6)


# ------------------------------------------------------------------------------------------------------------- CLI

def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "block.deploy.inventory", *map(str, args)], check=False,
                          cwd=cwd, capture_output=True, text=True, timeout=60)


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "x.yaml"
    r = _cli("--manifest", MANIFEST, "--name", "t", "--out", out, "--user", "bob")
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout and "bob@amd057.utah.cloudlab.us:22" in r.stdout and "10.10.1.3" in r.stdout
    cfg = OmegaConf.load(out)
    assert (cfg.name, cfg.num_instances) == ("t", 3)
    assert [h.user for h in hosts_from_config(cfg)] == ["bob"] * 3

    r = _cli("--manifest", MANIFEST, "--name", "t", "--out", out, "--user", "alice")
    assert r.returncode == 2 and "exists; pass --force" in r.stderr and "Traceback" not in r.stderr
    assert OmegaConf.load(out).hosts[0].user == "bob"  # untouched

    bad = tmp_path / "bad.xml"
    bad.write_text("<rspec><node client_id='a'>")
    r = _cli("--manifest", bad, "--name", "t", "--out", out, "--force")
    assert r.returncode == 2 and "not valid XML" in r.stderr and str(bad) in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_overrides_print_and_errors(tmp_path, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("h0\nh1\nh2\n")
    hosts, path = str(hosts), hosts
    assert main(["--hosts-file", hosts, "--name", "lab", "--instances-per-host", "2", "--scheduler", "node2",
                 "--gpu", "no", "--workdir", "/w", "--print"]) == 0
    captured = capsys.readouterr()
    cfg = OmegaConf.create(captured.out)
    assert cfg.num_instances == 6
    assert [list(h.roles) for h in cfg.hosts] == [["engine"], ["engine"], ["engine", "scheduler"]]
    assert {(h.gpu, h.workdir) for h in cfg.hosts} == {("no", "/w")}
    assert "node2" in captured.err  # the table goes to stderr with --print
    assert not (ROOT / "conf" / "cluster" / "lab.yaml").exists()

    assert main(["--hosts-file", hosts, "--name", "lab", "--scheduler", "node9", "--print"]) == 2
    assert "--scheduler 'node9' is not a host (hosts: node0, node1, node2)" in capsys.readouterr().err
    assert main(["--hosts-file", str(tmp_path / "missing"), "--name", "lab", "--print"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["--hosts-file", hosts, "--name", "../x", "--print"]) == 2
    path.write_text("h0 instances=0\n")
    assert main(["--hosts-file", hosts, "--name", "lab", "--print"]) == 2
    assert "no engine instances in total" in capsys.readouterr().err


def test_cli_help_has_an_example():
    r = _cli("--help")
    assert r.returncode == 0 and "--manifest manifest.xml --user alice" in r.stdout
