"""ssh's error output turned into a cause a user can act on, naming the hop."""

from __future__ import annotations

from gpufleet.ssherrors import explain, hides_cause

KNOWN = "/home/u/.gpufleet/fleets/f/known_hosts"


def test_changed_host_key_is_refused_with_the_file_and_the_fix():
    raw = ("@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
           "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n"
           "Host key verification failed.\n")
    msg = explain(raw, "10.0.0.1:22", KNOWN)
    assert msg.startswith("host key of 10.0.0.1:22 changed since it was recorded in " + KNOWN)
    assert "ssh-keygen -R" in msg
    assert "in /" not in explain("Host key verification failed.", "h:22")  # no file named when none is known


def test_permission_denied_names_the_methods_tried():
    raw = "Warning: Permanently added 'h' (ED25519) to the list of known hosts.\nu@h: Permission denied (publickey).\n"
    assert explain(raw, "h:22") == "login refused by h:22 (Permission denied (publickey)): check user and identity_file"


def test_the_login_node_reports_why_it_cannot_reach_the_target():
    raw = "channel 0: open failed: connect failed: No route to host\nstdio forwarding failed\n"
    assert explain(raw, "n:22") == "the login node cannot reach it: No route to host"


def test_network_errors_keep_ssh_s_own_line():
    raw = "Failed to connect to the host via ssh: ssh: connect to host 198.18.0.2 port 22: Connection refused\n"
    assert explain(raw, "198.18.0.2:22") == "ssh: connect to host 198.18.0.2 port 22: Connection refused"
    assert explain("ssh: connect to host x port 22: Connection timed out", "x:22").endswith("Connection timed out")


def test_anything_else_is_its_last_line_or_a_generic_cause():
    assert explain("first\n\nsomething odd happened\n", "h:22") == "something odd happened"
    assert explain("", "h:22") == "connection failed"
    assert explain("Failed to connect to the host via ssh: ", "h:22") == "connection failed"


def test_messages_that_hide_the_cause_behind_a_shared_master():
    assert hides_cause("kex_exchange_identification: Connection closed by remote host")
    assert hides_cause("ssh: connect to host n port 22: UNKNOWN port 65535")
    assert not hides_cause("Permission denied (publickey)")


def test_the_fix_for_a_changed_host_key_names_the_entry_and_the_file():
    raw = "Host key verification failed.\n"
    assert "ssh-keygen -R 10.0.0.1 -f " + KNOWN in explain(raw, "10.0.0.1:22", KNOWN)
    assert "ssh-keygen -R '[10.0.0.1]:2222' -f " + KNOWN in explain(raw, "10.0.0.1:2222", KNOWN)


def test_the_hop_that_cannot_reach_the_next_is_named():
    raw = "channel 0: open failed: connect failed: Connection refused\nstdio forwarding failed\n"
    assert explain(raw, "l:22", via="gateway g:22 (hop 1 of 2)") == \
        "gateway g:22 (hop 1 of 2) cannot reach it: Connection refused"
    assert explain("u@h: Permission denied (publickey).", "h:22", check="ssh_config.proxy_jump[1]") == \
        "login refused by h:22 (Permission denied (publickey)): check ssh_config.proxy_jump[1]"
