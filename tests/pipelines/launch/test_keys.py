"""The cluster's CURVE keys on disk: written 0600 in a 0700 directory whatever the umask,
never over old keys, readable by pyzmq's own certificate loader, and refused by the
loader when the directory or a key file is open to group or others."""

import os
import stat

import pytest
import zmq.auth

from pipelines.cli import main
from pipelines.launch import KeysError, init_keys, load_keys


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def permissive_umask():
    """umask 000: a writer that relied on the umask would leave files 0666."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_init_writes_a_keypair_per_node_owner_only_whatever_the_umask(tmp_path, permissive_umask):
    keys = init_keys(tmp_path / "keys", 3)
    names = sorted(p.name for p in (tmp_path / "keys").iterdir())
    assert names == [f"node-{k}.key{s}" for k in range(3) for s in ("", "_secret")]
    assert mode(tmp_path / "keys") == 0o700
    assert {mode(tmp_path / "keys" / n) for n in names} == {0o600}
    assert keys.nodes == 3 and len(set(keys.public)) == 3
    for node in range(3):  # pyzmq's loader reads them: the files are zmq certificates
        public, secret = zmq.auth.load_certificate(tmp_path / "keys" / f"node-{node}.key_secret")
        assert keys.keypair(node) == (public, secret)
        assert zmq.auth.load_certificate(tmp_path / "keys" / f"node-{node}.key") == (public, None)
        assert keys.node_of(public) == node and keys.node_of(public.decode()) == node
    assert keys.node_of(zmq.curve_keypair()[0]) is None
    assert load_keys(tmp_path / "keys") == keys


def test_init_into_an_existing_empty_directory_makes_it_owner_only(tmp_path, permissive_umask):
    (tmp_path / "keys").mkdir(mode=0o755)
    init_keys(tmp_path / "keys", 1)
    assert mode(tmp_path / "keys") == 0o700


def test_init_never_writes_over_existing_keys(tmp_path, raises_one_line):
    first = init_keys(tmp_path / "keys", 2)
    with raises_one_line(KeysError, match="not empty; keys are never overwritten"):
        init_keys(tmp_path / "keys", 2)
    assert load_keys(tmp_path / "keys") == first


@pytest.mark.parametrize("file_mode", [0o640, 0o604, 0o644, 0o660])
def test_a_key_file_others_may_read_is_refused_naming_it_and_its_mode(
    tmp_path, file_mode, raises_one_line
):
    init_keys(tmp_path / "keys", 2)
    loose = tmp_path / "keys" / "node-1.key_secret"
    loose.chmod(file_mode)
    with raises_one_line(KeysError, match=f"{loose}: mode {file_mode:04o} .*chmod 600 {loose}"):
        load_keys(tmp_path / "keys")


def test_a_public_key_file_others_may_read_is_refused_too(tmp_path, raises_one_line):
    init_keys(tmp_path / "keys", 1)
    (tmp_path / "keys" / "node-0.key").chmod(0o644)
    with raises_one_line(KeysError, match="node-0.key: mode 0644"):
        load_keys(tmp_path / "keys")


def test_a_keys_directory_others_may_enter_is_refused(tmp_path, raises_one_line):
    init_keys(tmp_path / "keys", 1)
    (tmp_path / "keys").chmod(0o755)
    with raises_one_line(KeysError, match=r"keys: mode 0755 .*chmod 700"):
        load_keys(tmp_path / "keys")


def test_a_gap_in_the_node_numbers_is_refused(tmp_path, raises_one_line):
    keys_dir = tmp_path / "keys"
    init_keys(keys_dir, 3)
    (keys_dir / "node-1.key").unlink()
    (keys_dir / "node-1.key_secret").unlink()
    with raises_one_line(KeysError, match="no key for node 1"):
        load_keys(keys_dir)


def test_a_public_key_file_of_another_keypair_is_refused(tmp_path, raises_one_line):
    init_keys(tmp_path / "keys", 1)
    init_keys(tmp_path / "other", 1)
    (tmp_path / "other" / "node-0.key").replace(tmp_path / "keys" / "node-0.key")
    with raises_one_line(KeysError, match="node-0.key_secret: its public key differs"):
        load_keys(tmp_path / "keys")


def test_a_directory_without_keys_is_refused(tmp_path, raises_one_line):
    (tmp_path / "empty").mkdir(mode=0o700)
    with raises_one_line(KeysError, match="holds no node-K.key files"):
        load_keys(tmp_path / "empty")
    with raises_one_line(KeysError, match="no such keys directory"):
        load_keys(tmp_path / "absent")


def test_a_node_without_its_secret_file_has_public_keys_only(tmp_path, raises_one_line):
    keys_dir = tmp_path / "keys"
    init_keys(keys_dir, 2)
    (keys_dir / "node-0.key_secret").unlink()  # node 1's copy: every public, its own secret
    keys = load_keys(keys_dir)
    assert keys.nodes == 2 and keys.keypair(1)[0] == keys.public[1]
    with raises_one_line(KeysError, match="node-0.key_secret: not found"):
        keys.keypair(0)


def test_zerotrain_keys_init_writes_them_and_refuses_a_second_time(tmp_path, capsys):
    assert main(["keys", "init", str(tmp_path / "k"), "--nodes", "2"]) == 0
    assert "wrote CURVE keys for 2 node(s)" in capsys.readouterr().out
    assert load_keys(tmp_path / "k").nodes == 2
    assert main(["keys", "init", str(tmp_path / "k"), "--nodes", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "zerotrain keys: " in err and "never overwritten" in err
    assert main(["keys"]) == 2
    assert "expected init DIR --nodes N" in capsys.readouterr().err
    assert main(["keys", "init", str(tmp_path / "j"), "--nodes", "0"]) == 2
    assert "--nodes: expected a positive integer, got '0'" in capsys.readouterr().err
