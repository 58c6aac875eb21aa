"""`ssh RUN-NAME` into a dev environment: the container's SSH server, and the user's ssh entry for it.

Container side (written into the dev environment's start script by ``sshd_script``, called from
launch): the image's own sshd (``/usr/sbin/sshd``; when missing, the image's package manager is
asked for openssh-server, as dstack does) with a config of gpufleet's: public keys only, the run's
pinned host key, root only by key, listening on ``SSHD_PORT`` in the container's network namespace
(on the host's 127.0.0.1 at ``sshd_port`` for a dev environment on the host's network), each
session started with the run's environment. The host key is made by the server when the run is
submitted (``new_host_key``) and reaches the container as a sealed secret (``HOST_KEY_ENV``), which
the script takes out of the environment before anything else runs. A dev environment with `ide`
fails to start (exit ``NO_SSHD_EXIT``, the reason in its log) when no sshd can be had; one without
`ide` starts all the same (a shell through `gpufleet attach` needs no sshd).

Client side: the user's key pair ($GPUFLEET_HOME/ssh/id_ed25519, made once), and an include file
(~/.ssh/gpufleet/config, `Include`d from the top of ~/.ssh/config) with one `Host RUN-NAME` per
dev environment: ProxyCommand `gpufleet ssh-proxy RUN PORT` (the connection carried through the
server's tunnel and the fleet's jump chain: users hold no fleet key), the run's host key pinned
(its own known_hosts file, StrictHostKeyChecking yes). Nothing here touches the state: both sides
import it.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import zlib
from pathlib import Path

from gpufleet.models.run import SSHD_PORT

HOST_KEY_ENV = "GPUFLEET_SSHD_HOST_KEY"  # the sealed run secret carrying the container's host key
NO_SSHD_EXIT = 97  # the start script's exit code when a dev environment with `ide` can have no sshd
SSHD_PATHS = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd", "/usr/bin/sshd")  # where images have it
SSHD_DIR = "/tmp/gpufleet-sshd"  # in the container: its sshd's config, keys and log (0700)
_PUBLIC_KEY_RE = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+={0,3}$")
_BEGIN = "# gpufleet: dev environments (ssh RUN-NAME); written by `gpufleet attach`"


# --------------------------------------------------------------------------- keys

def new_host_key() -> tuple[str, str]:
    """A new ed25519 key: (its private key in OpenSSH's format, its public key line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode("ascii")
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode("ascii")
    return private, public


def public_of(private: str) -> str:
    """The public key line of an OpenSSH private key (``new_host_key``'s)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_private_key(private.encode("ascii"), password=None)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode("ascii")


def check_public_key(text: str) -> str:
    """``text`` as one public key line (type and base64, a comment dropped); ValueError if it is not one."""
    words = text.strip().split()
    line = " ".join(words[:2])
    if len(words) < 2 or len(line) > 8192 or not _PUBLIC_KEY_RE.fullmatch(line):
        raise ValueError("not an ssh public key (ssh-ed25519 AAAA...)")
    return line


# --------------------------------------------------------------------------- the container's side

def sshd_port(host_network: bool, run_id: str) -> int:
    """The port the dev environment's sshd listens on: SSHD_PORT in its own network namespace; on the
    host's network (`network: host`), one of 10022..19999 chosen by the run's id, on 127.0.0.1, so two
    such dev environments on one host rarely meet (the start fails clearly if they do)."""
    return SSHD_PORT if not host_network else 10022 + zlib.crc32(run_id.encode()) % 9978


def sshd_script(host_public_key: str, port: int, loopback: bool, required: bool) -> str:
    """The lines of a dev environment's start script (POSIX sh, under `set -e`) that start its sshd:
    the host key taken from HOST_KEY_ENV (and out of the environment), the run's environment kept for
    the sessions, the config written, sshd started in the background. ``required`` (`ide` is set):
    without an sshd the script exits NO_SSHD_EXIT with the reason; else it says so and goes on."""
    check_public_key(host_public_key)
    d = SSHD_DIR
    config = "\n".join([
        f"Port {int(port)}", f"ListenAddress {'127.0.0.1' if loopback else '0.0.0.0'}",
        f"HostKey {d}/host_key", f"PidFile {d}/sshd.pid", f"AuthorizedKeysFile {d}/authorized_keys",
        "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no", "PrintMotd no", "UseDNS no",
        # every session starts with the run's environment (what the container's commands have)
        f'ForceCommand . {d}/environment; if [ -n "$SSH_ORIGINAL_COMMAND" ]; then eval "$SSH_ORIGINAL_COMMAND"; '
        'else exec "${SHELL:-/bin/sh}" -l; fi',
        "Subsystem sftp SFTP_SERVER",
    ])
    missing = (f'echo "gpufleet: image has no sshd and could not install openssh-server: $gf_why" >&2; '
               f'exit {NO_SSHD_EXIT}') if required else \
        (f'echo "$gf_why" > {SSHD_DIR}/no-sshd; echo "gpufleet: no SSH server in this dev environment '
         '(ssh RUN-NAME will not work): image has no sshd and could not install openssh-server: $gf_why" >&2; exit 0')
    lines = [
        "# gpufleet: the dev environment's SSH server (ssh RUN-NAME, VS Code Remote-SSH)",
        f'gf_key="${{{HOST_KEY_ENV}:-}}"; unset {HOST_KEY_ENV}',
        "(",
        f"umask 077; mkdir -p {d}; chmod 700 {d}",
        # bash writes `declare -x NAME="..."`: the same quoting as `export NAME="..."`, which any sh reads
        # (less what belongs to a session: its terminal, its directories)
        f"export -p | sed -e 's/^declare -x /export /' -e '/^export TERM=/d' -e '/^export PWD=/d' "
        f"-e '/^export OLDPWD/d' -e '/^export SHLVL=/d' > {d}/environment 2>/dev/null || export -p > {d}/environment",
        f'printf "%s\\n" "$gf_key" > {d}/host_key',
        f"echo {shlex.quote(host_public_key)} > {d}/host_key.pub",
        f": >> {d}/authorized_keys",
        f"gf_find() {{ for p in {' '.join(SSHD_PATHS)}; do "
        '[ -x "$p" ] && gf_sshd="$p" && return 0; done; return 1; }',
        'gf_sshd=; gf_why="no /usr/sbin/sshd"',
        "if ! gf_find; then",
        '  if [ "$(id -u)" != 0 ]; then gf_why="no /usr/sbin/sshd, and not root to install openssh-server";',
        "  elif command -v apt-get >/dev/null 2>&1; then "
        "(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server) "
        f"> {d}/install.log 2>&1"
        ' || gf_why="apt-get install openssh-server failed: $(tail -n 1 ' f'{d}/install.log)";',
        "  elif command -v dnf >/dev/null 2>&1; then "
        f"dnf install -y -q openssh-server > {d}/install.log 2>&1"
        ' || gf_why="dnf install openssh-server failed: $(tail -n 1 ' f'{d}/install.log)";',
        "  elif command -v yum >/dev/null 2>&1; then "
        f"yum install -y -q openssh-server > {d}/install.log 2>&1"
        ' || gf_why="yum install openssh-server failed: $(tail -n 1 ' f'{d}/install.log)";',
        "  elif command -v apk >/dev/null 2>&1; then "
        f"apk add -q openssh-server > {d}/install.log 2>&1"
        ' || gf_why="apk add openssh-server failed: $(tail -n 1 ' f'{d}/install.log)";',
        '  else gf_why="no /usr/sbin/sshd, and no package manager (apt-get, dnf, yum, apk) to install openssh-server";',
        "  fi",
        f'  gf_find || {{ {missing}; }}',
        "fi",
        "gf_sftp=internal-sftp; for p in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server "
        '/usr/lib/ssh/sftp-server; do [ -x "$p" ] && gf_sftp="$p" && break; done',
        f"cat > {d}/sshd_config <<'GPUFLEET_SSHD_CONFIG'",
        config,
        "GPUFLEET_SSHD_CONFIG",
        f'sed -i "s#SFTP_SERVER#$gf_sftp#" {d}/sshd_config 2>/dev/null || true',
        '[ "$(id -u)" = 0 ] && mkdir -p /run/sshd /var/empty && chmod 755 /run/sshd',
        f'"$gf_sshd" -f {d}/sshd_config -E {d}/sshd.log || {{ gf_why="sshd did not start: '
        f'$(tail -n 1 {d}/sshd.log 2>/dev/null)"; {missing}; }}',
        ")",
        "unset gf_key",
    ]
    return "\n".join(lines)


def register_script() -> str:
    """The shell command, run in a dev environment's container (`exec -i`), that adds the public key
    on its stdin to its sshd's authorized keys (once) and prints ``ok`` with the host key, the port
    and the working directory, or ``no-sshd`` with why."""
    d = SSHD_DIR
    return (f'read -r k; f={d}/authorized_keys; i=0; '
            # a dev environment that just started: its sshd may be a moment away
            f'while [ $i -lt 40 ] && ! [ -s {d}/sshd.pid ] && ! [ -e {d}/no-sshd ]; do sleep 0.25; i=$((i+1)); done; '
            f'if ! [ -s {d}/sshd.pid ] || ! kill -0 "$(cat {d}/sshd.pid)" 2>/dev/null; then '
            f'echo no-sshd; cat {d}/no-sshd 2>/dev/null || tail -n 2 {d}/sshd.log 2>/dev/null; exit 0; fi; '
            'found=; while read -r l; do [ "$l" = "$k" ] && found=1; done < "$f"; '
            '[ -n "$found" ] || printf "%s\\n" "$k" >> "$f"; '
            f'echo ok; cat {d}/host_key.pub; pwd; id -un 2>/dev/null || id -u')


def read_register_answer(text: str) -> dict:
    """``register_script``'s answer: {"ok": True, host_key, workdir, user} or {"ok": False, why}."""
    lines = [line.strip() for line in text.splitlines()]
    if lines and lines[0] == "ok" and len(lines) >= 4:
        return {"ok": True, "host_key": check_public_key(lines[1]), "workdir": lines[2] or "/", "user": lines[3]}
    why = " ".join(x for x in lines[1:] if x) if lines and lines[0] == "no-sshd" else text.strip()[-300:]
    return {"ok": False, "why": why or "its SSH server is not running"}


# --------------------------------------------------------------------------- inactivity_duration

ATTACH_MARK = "GPUFLEET_ATTACHED"  # in the environment of a `gpufleet attach` shell (runs.shell_command)


def connections_script() -> str:
    """The shell command, run in a dev environment's container, that prints what ``connections``
    reads: its TCP sockets (/proc/net/tcp, tcp6), then the stat line of each process marked as a
    `gpufleet attach` shell (or one of its children)."""
    return (f"cat /proc/net/tcp /proc/net/tcp6 2>/dev/null; echo {ATTACH_MARK}; "
            f'for p in /proc/[0-9]*; do grep -q {ATTACH_MARK}=1 "$p/environ" 2>/dev/null && cat "$p/stat"; done; true')


def connections(text: str, port: int) -> int:
    """How many connections a dev environment has, from ``connections_script``'s answer: established
    TCP connections to its sshd's ``port``, and `gpufleet attach` shells (a marked process whose parent
    is outside the container: the runtime's exec; its children are not counted, so a process left
    running by a shell that ended does not keep the dev environment busy)."""
    sockets, _, shells = text.partition(ATTACH_MARK)
    count = 0
    for line in sockets.splitlines():
        fields = line.split()
        if len(fields) > 3 and ":" in fields[1] and fields[3] == "01":  # st 01: ESTABLISHED
            local_port = fields[1].rsplit(":", 1)[1]
            if all(c in "0123456789ABCDEFabcdef" for c in local_port) and int(local_port, 16) == port:
                count += 1
    for line in shells.splitlines():
        after = line.rpartition(")")[2].split()  # pid (comm) state ppid ...: comm may hold anything
        if len(after) > 1 and after[1] == "0":
            count += 1
    return count


# --------------------------------------------------------------------------- the user's side

def ide_link(ide: str | None, name: str, workdir: str) -> str:
    """The link that opens ``workdir`` of dev environment ``name`` in ``ide`` over Remote-SSH (dstack's
    forms: `vscode://vscode-remote/ssh-remote+NAME/DIR`, cursor://, windsurf://; `zed://ssh/NAME/DIR`)."""
    workdir = "/" + workdir.lstrip("/")
    if ide == "zed":
        return f"zed://ssh/{name}{workdir}"
    return f"{ide or 'vscode'}://vscode-remote/ssh-remote+{name}{workdir}"


def user_key(home: Path) -> tuple[Path, str]:
    """The user's key for dev environments (``home``/ssh/id_ed25519, made 0600 on first use): its path
    and public key line."""
    d = home / "ssh"
    d.mkdir(parents=True, mode=0o700, exist_ok=True)
    path = d / "id_ed25519"
    if not path.exists():
        private, public = new_host_key()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(private)
        (d / "id_ed25519.pub").write_text(public + " gpufleet\n")
    return path, public_of(path.read_text())


def ssh_dir() -> Path:
    return Path.home() / ".ssh"


def _quote(value: str) -> str:
    """A value for ssh_config: quoted when it has spaces; ssh_config has no escapes, so no quotes inside."""
    if '"' in value or "\n" in value:
        raise ValueError(f"{value!r}: a path with a quote or a newline cannot be written in ssh_config")
    return f'"{value}"' if any(c.isspace() for c in value) else value


def proxy_command(name: str, port: int, environ: dict[str, str] | None = None) -> str:
    """The ProxyCommand of ``name``'s entry: this gpufleet (this Python) carrying the connection through
    the server, with this state directory and server (never a token: `gpufleet login` keeps it)."""
    environ = os.environ if environ is None else environ
    from gpufleet.paths import home

    env = [f"GPUFLEET_HOME={home()}"] + [f"{k}={environ[k]}" for k in ("GPUFLEET_SERVER",) if environ.get(k)]
    words = ["env", *env, sys.executable, "-m", "gpufleet", "ssh-proxy", name, str(int(port))]
    return shlex.join(words).replace("%", "%%")


def host_entry(name: str, port: int, user: str, identity: Path, known_hosts: Path, server: str = "") -> str:
    return "\n".join([
        f"Host {name}",
        f"  # gpufleet server {server}",
        f"  ProxyCommand {proxy_command(name, port)}",
        f"  User {user}",
        f"  IdentityFile {_quote(str(identity))}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {_quote(str(known_hosts))}",
        "  StrictHostKeyChecking yes",
        f"  HostKeyAlias gpufleet-{name}",
        "  ServerAliveInterval 30",
        "",
    ])


def _blocks(text: str) -> dict[str, str]:
    """The `Host NAME` blocks of the include file, by name."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines(keepends=True):
        m = re.match(r"^Host (\S+)\s*$", line)
        if m:
            current = m.group(1)
            blocks[current] = ""
        if current is not None:
            blocks[current] += line
    return blocks


def _write(path: Path, text: str) -> None:
    from gpufleet.paths import replace_private_file

    replace_private_file(path, text, "ssh")


def write_entry(name: str, port: int, user: str, host_key: str, identity: Path, server: str = "") -> Path:
    """Add or replace ``name``'s entry (and its pinned host key), noted as of gpufleet server ``server``,
    and make sure ~/.ssh/config includes the file; the include file's path."""
    d = ssh_dir() / "gpufleet"
    d.mkdir(parents=True, mode=0o700, exist_ok=True)
    (ssh_dir()).chmod(0o700)
    known = d / "known_hosts"
    pins = [line for line in (known.read_text().splitlines() if known.exists() else [])
            if line and not line.startswith(f"gpufleet-{name} ")]
    _write(known, "\n".join([*pins, f"gpufleet-{name} {check_public_key(host_key)}"]) + "\n")
    config = d / "config"
    blocks = _blocks(config.read_text() if config.exists() else "")
    blocks[name] = host_entry(name, port, user, identity, known, server)
    _write(config, _BEGIN + "\n" + "".join(blocks[n] for n in sorted(blocks)))
    include_from_user_config(config)
    return config


def remove_entries(keep: set[str] | None = None, drop: set[str] = frozenset(), server: str | None = None
                   ) -> list[str]:
    """Remove the entries (and pinned keys) of dev environments in ``drop`` or not in ``keep`` (None:
    keep all but ``drop``), of gpufleet server ``server`` only when given (another server's are its
    own); the names removed."""
    d = ssh_dir() / "gpufleet"
    config = d / "config"
    if not config.exists():
        return []
    blocks = _blocks(config.read_text())
    gone = [n for n, text in blocks.items()
            if (server is None or f"  # gpufleet server {server}\n" in text)
            and (n in drop or (keep is not None and n not in keep))]
    if not gone:
        return []
    _write(config, _BEGIN + "\n" + "".join(blocks[n] for n in sorted(blocks) if n not in gone))
    known = d / "known_hosts"
    if known.exists():
        lines = [line for line in known.read_text().splitlines()
                 if line and line.split(" ", 1)[0] not in {f"gpufleet-{n}" for n in gone}]
        _write(known, "".join(line + "\n" for line in lines))
    return gone


def include_from_user_config(include: Path) -> None:
    """Put `Include INCLUDE` at the top of ~/.ssh/config (made 0600 if missing), once; the rest of
    the file is left as it is. At the top: an Include after a `Host` line would belong to that Host.
    The path is absolute (ssh reads a relative one under the passwd home, not $HOME)."""
    path = ssh_dir() / "config"
    line = f"Include {_quote(str(include))}"
    text = path.read_text() if path.exists() else ""
    if any(x.strip() == line for x in text.splitlines()):
        return
    mode = (path.stat().st_mode & 0o777) if path.exists() else 0o600
    new = f"# gpufleet's dev environments (ssh RUN-NAME)\n{line}\n" + ("\n" if text else "") + text
    tmp = path.with_name(f".config.gpufleet.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.replace(tmp, path)
