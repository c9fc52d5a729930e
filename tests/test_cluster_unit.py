"""The namespace cluster's checks that need no namespace, no root and no daemon: cluster names at
every entry point, root's ssh folder (from the password database, never followed through a
link) and the /etc/hosts writer. The cluster itself: tests/test_cluster.py."""
import os
import pwd
from pathlib import Path

import pytest

from dtlab import cli
from dtlab.cluster import netns
from dtlab.cluster.netns import Cluster, ClusterError


def _cli_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dtlab: error: "), err
    return err[0]


@pytest.fixture
def state(tmp_path, monkeypatch):
    """The cluster state folder in a temporary place, with a well-formed cluster.json one level
    above it (where a name ../x would lead)."""
    root = tmp_path / "state"
    root.mkdir()
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "cluster.json").write_text(Cluster(name="x").to_json())
    monkeypatch.setattr(netns, "STATE_ROOT", root)
    return tmp_path


@pytest.mark.parametrize("action,argv", [
    ("up", []), ("down", []), ("status", []), ("status", ["--json"]),
    ("exec", ["x1", "--", "true"]), ("link", ["x1", "down"]), ("firewall", ["x1", "--clear"])])
def test_a_cluster_name_with_a_path_in_it_is_refused_by_every_command(state, capsys, action,
                                                                       argv):
    for bad in ("../x", "x/..", "Main", "a" * 7, ""):
        line = _cli_error(capsys, "cluster", action, "--name", bad, *argv)
        assert f"--name {bad!r}: 1-6 lowercase letters and digits, starting with a letter" \
            in line, line
    assert not any(state.joinpath("state").iterdir())  # nothing made, nothing followed


def test_cluster_load_refuses_a_path_and_names_the_flag(state):
    with pytest.raises(ClusterError, match=r"--cluster '\.\./x': 1-6 lowercase letters"):
        Cluster.load("../x")
    with pytest.raises(ClusterError, match=r"--name '\.\./x': 1-6 lowercase"):
        Cluster.load("../x", flag="--name")
    with pytest.raises(ClusterError, match="no cluster 'x' is up"):
        Cluster.load("x")  # a good name still reads the state folder, not the one above


def test_run_across_nodes_refuses_a_path_as_cluster(state):
    from dtlab.launch.launcher import Placement, torchrun
    with pytest.raises(ClusterError, match=r"--cluster '\.\./x'"):
        torchrun("labs.ddp", [], Placement(nproc=1, nnodes=2, cluster="../x"))


def _fake_home(monkeypatch, home: Path) -> None:
    real = pwd.getpwuid(os.getuid())
    fake = pwd.struct_passwd((*real[:5], str(home), real[6]))  # pw_dir is the sixth field
    monkeypatch.setattr(netns.pwd, "getpwuid", lambda uid: fake)


def test_root_ssh_folder_comes_from_the_password_database_not_HOME(tmp_path, monkeypatch):
    """sudo -E keeps the invoking user's HOME: the cluster must not write that user's ~/.ssh."""
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert netns.ssh_dir() == Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh"
    _fake_home(monkeypatch, tmp_path / "root")
    (tmp_path / "root").mkdir()
    assert netns.ssh_dir() == tmp_path / "root" / ".ssh"
    assert (tmp_path / "root" / ".ssh").is_dir() and not (tmp_path / "user").exists()
    assert (tmp_path / "root" / ".ssh").stat().st_mode & 0o777 == 0o700


def test_a_linked_ssh_folder_or_file_is_refused_and_not_followed(tmp_path, monkeypatch):
    home, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    _fake_home(monkeypatch, home)
    (home / ".ssh").symlink_to(elsewhere)
    with pytest.raises(ClusterError, match=r"\.ssh is a symbolic link"):
        netns.ssh_dir()
    (home / ".ssh").unlink()
    (home / ".ssh").mkdir(mode=0o700)
    target = elsewhere / "keys"
    target.write_text("")
    (home / ".ssh" / "authorized_keys").symlink_to(target)
    with pytest.raises(ClusterError, match="authorized_keys is a symbolic link"):
        netns.append_line(netns.ssh_dir() / "authorized_keys", "ssh-ed25519 AAAA root")
    assert target.read_text() == ""
    netns.append_line(home / ".ssh" / "known_hosts", "n1 ssh-ed25519 AAAA")
    assert (home / ".ssh" / "known_hosts").read_text() == "n1 ssh-ed25519 AAAA\n"
    assert (home / ".ssh" / "known_hosts").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("mounted", [False, True])
def test_hosts_file_is_replaced_whole(tmp_path, monkeypatch, mounted):
    """Not a mount point: a new file renamed over it (a reader never sees half of it). A mount
    point (a container's bind-mounted /etc/hosts, where a rename fails): written in place."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n10.77.0.11 n1   # dtlab cluster main\n")
    hosts.chmod(0o644)
    inode = hosts.stat().st_ino
    monkeypatch.setattr(netns.os.path, "ismount", lambda p: mounted)
    netns.write_hosts(["127.0.0.1 localhost", "10.77.0.12 n2   # dtlab cluster main"], hosts)
    assert hosts.read_text() == "127.0.0.1 localhost\n10.77.0.12 n2   # dtlab cluster main\n"
    assert (hosts.stat().st_ino == inode) is mounted
    assert hosts.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hosts"]  # no temporary file left
