"""`megatrain launch`: a checked `deepspeed --hostfile` launch over pdsh + ssh.

    megatrain launch --hostfile hostfile pretrain --config configs/llama-1.3b.yaml --set train.max_steps=1000

Before anything starts it runs a preflight on every host, in parallel, over ssh: the host answers,
the launch directory and the venv exist there, `import megatrain` gives this version from that venv,
the data and checkpoint paths are visible, and (on the first host) the master port is free. Each
failure is one line naming the host. Then it writes `.deepspeed_env` (the variables the ranks need:
pdsh forwards only PYTHON*, so DS_ACCELERATOR, OMP_NUM_THREADS, NCCL_*/GLOO_* interface names,
WANDB_* ... go through that file) and hands over to DeepSpeed's runner with `--venv_script`.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import megatrain
from megatrain.fileio import write_atomic
from megatrain.launch.hostfile import is_host_address, parse_hostfile

ENTRYPOINTS = ("pretrain", "finetune")  # megatrain.<name>, a module that runs under DeepSpeed's launcher

# Variables the ranks need that pdsh would not carry (DeepSpeed forwards only PYTHON*, MLFLOW*, MV2*, UCX*).
FORWARD_PREFIXES = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NCCL_", "GLOO_", "TP_SOCKET_IFNAME",
                    "CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_EXTENSIONS_DIR", "TORCH_DISTRIBUTED_DEBUG", "WANDB_",
                    "HF_", "TOKENIZERS_PARALLELISM", "MEGATRAIN_")
# DeepSpeed writes `export KEY=VAL;` into a remote shell line (quoting VAL with "..." when it has spaces):
# a value with these characters would be mangled or executed there.
UNSAFE_VALUE = re.compile(r'["$`\\\n\r]')


class LaunchError(ValueError):
    pass


def default_venv() -> str:
    """The active virtual environment (where `deepspeed` and megatrain are installed)."""
    return os.environ.get("VIRTUAL_ENV") or sys.prefix


# ---------------------------------------------------------------------------------------------------- .deepspeed_env

def collect_env(environ: dict, extra: list[str]) -> tuple[dict[str, str], list[str]]:
    """The variables to write: those in FORWARD_PREFIXES from `environ`, then `--env KEY=VAL` ones.
    Returns (variables, notices about variables skipped)."""
    out, notices = {}, []
    for key in sorted(environ):
        if key.startswith(FORWARD_PREFIXES):
            if UNSAFE_VALUE.search(environ[key]):
                notices.append(f"not forwarding {key}: its value has a quote, $, backslash or newline "
                               f"(set it in the venv's bin/activate on every node instead)")
            else:
                out[key] = environ[key]
    for item in extra:
        key, sep, val = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise LaunchError(f"--env {item!r}: write KEY=VALUE")
        if UNSAFE_VALUE.search(val):
            raise LaunchError(f"--env {key}: the value may not contain a quote, $, backslash or newline "
                              f"(DeepSpeed pastes it into a remote shell line)")
        out[key] = val
    return out, notices


def write_deepspeed_env(path: str, variables: dict[str, str]) -> list[str]:
    """Merge `variables` into the KEY=VAL file DeepSpeed's runner reads (ours win over older lines).
    Blank and comment lines are dropped: DeepSpeed splits every line on '=' and fails on them."""
    kept: dict[str, str] = {}
    dropped = 0
    if os.path.isfile(path):
        for line in open(path).read().splitlines():
            key, sep, val = line.partition("=")
            if sep and key.strip() and not key.lstrip().startswith("#"):
                kept[key.strip()] = val
            else:
                dropped += 1
    kept.update(variables)
    write_atomic(path, "".join(f"{k}={v}\n" for k, v in kept.items()), mode=0o600)  # it may hold WANDB_API_KEY
    return [f"dropped {dropped} blank/comment line(s) from {path} (DeepSpeed cannot parse them)"] if dropped else []


# ---------------------------------------------------------------------------------------------------------- preflight

# Runs on each host through `ssh HOST bash -s`; prints one `PROBE {json}` line, or a word saying what is missing.
PROBE = r"""
cd {cwd} 2>/dev/null || {{ echo "MISSING cwd"; exit 0; }}
[ -f {venv}/bin/activate ] || {{ echo "MISSING venv"; exit 0; }}
source {venv}/bin/activate
python - <<'MEGATRAIN_PROBE'
import errno, importlib.util, json, os, socket, sys
ask = json.loads({ask})
out = {{"prefix": os.path.realpath(sys.prefix)}}
try:
    import megatrain
    out["version"] = megatrain.__version__
    out["entrypoint"] = importlib.util.find_spec("megatrain." + ask["entrypoint"]) is not None
except Exception as e:
    out["import_error"] = f"{{type(e).__name__}}: {{e}}"
out["missing"] = [p for p in ask["paths"] if not os.path.exists(p)]
d = ask["checkpoint_dir"]
while d and not os.path.exists(d):
    d = os.path.dirname(d.rstrip("/")) or "."
out["checkpoint_writable"] = os.access(d, os.W_OK | os.X_OK)
if ask["port"]:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", ask["port"]))
        except OSError as e:
            out["port_busy"] = e.strerror
print("PROBE " + json.dumps(out))
MEGATRAIN_PROBE
"""


def entrypoint_paths(entrypoint: str, args: list[str]) -> tuple[list[str], str]:
    """(files every host must see, checkpoint dir) from the entrypoint's --config/--set arguments."""
    from megatrain.config import load_config
    from megatrain.data import parse_data_path
    from megatrain.data.indexed import bin_path, idx_path
    from megatrain.data.tokenizer import parse_spec

    p = argparse.ArgumentParser(add_help=False)
    importlib.import_module(f"megatrain.{entrypoint}").add_arguments(p)  # the entrypoint's own --config/--set
    known, _ = p.parse_known_args(args)
    cfg = load_config(known.config, known.set)
    paths = [known.config] if os.path.sep in known.config or known.config.endswith((".yaml", ".yml")) else []
    if cfg.data.path not in (None, "", []):
        for _, prefix in parse_data_path(cfg.data.path):
            paths += [bin_path(prefix), idx_path(prefix)]
    _, tok_path = parse_spec(cfg.data.tokenizer or "")
    if tok_path:
        paths.append(tok_path)
    f = cfg.finetune  # a fine-tuning run reads its pretrained model and its example files on every node
    paths += [x for x in (f.init, f.train_file, f.valid_file, f.test_file, cfg.checkpoint.init) if x]
    return paths, cfg.checkpoint.dir


def ssh_command(host: str, ssh_port: int | None, connect_timeout: int) -> list[str]:
    return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout}"] + \
        (["-p", str(ssh_port)] if ssh_port else []) + [host, "bash", "-s"]


def probe_host(host: str, script: str, ssh_port: int | None, timeout: int) -> tuple[str, dict | str]:
    """(host, the probe's answer) or (host, why it gave none)."""
    try:
        r = subprocess.run(ssh_command(host, ssh_port, min(timeout, 15)), input=script, capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return host, f"not reachable over ssh: no answer in {timeout} s"
    for line in r.stdout.splitlines():
        if line.startswith("PROBE "):
            return host, json.loads(line[6:])
        if line.startswith("MISSING "):
            return host, line.split()[1]
    err = (r.stderr.strip().splitlines() or [f"ssh exited {r.returncode}"])[-1]
    return host, f"not reachable over ssh: {err}" if r.returncode == 255 else f"probe failed: {err}"


def preflight(hosts: list[str], venv: str, entrypoint: str, paths: list[str], checkpoint_dir: str,
              master_port: int, ssh_port: int | None = None, timeout: int = 60) -> list[str]:
    """One line per problem found, each naming its host; empty when every host is ready."""
    cwd = os.getcwd()
    abs_paths = [os.path.join(cwd, p) for p in paths]
    abs_ckpt = os.path.join(cwd, checkpoint_dir)
    venv_real = os.path.realpath(venv)

    def script(first: bool) -> str:
        ask = dict(entrypoint=entrypoint, paths=abs_paths, checkpoint_dir=abs_ckpt, port=master_port if first else 0)
        return PROBE.format(cwd=shlex.quote(cwd), venv=shlex.quote(venv), ask=repr(json.dumps(ask)))

    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        answers = list(pool.map(lambda ih: probe_host(ih[1], script(ih[0] == 0), ssh_port, timeout), enumerate(hosts)))
    problems = []
    for host, a in answers:
        say = lambda what: problems.append(f"preflight: {host}: {what}")  # noqa: E731
        if a == "cwd":
            say(f"launch directory {cwd} does not exist there (DeepSpeed runs every rank from it: use a shared filesystem)")
        elif a == "venv":
            say(f"no venv at {venv} ({venv}/bin/activate missing): make the same venv at the same path on every node, "
                f"or pass --venv")
        elif isinstance(a, str):
            say(a)
        elif "import_error" in a:
            say(f"`import megatrain` fails in {venv}: {a['import_error']}")
        else:
            if a["prefix"] != venv_real:
                say(f"python there runs from {a['prefix']}, not {venv_real}: is {venv} a venv?")
            if a["version"] != megatrain.__version__:
                say(f"megatrain {a['version']} there, {megatrain.__version__} here: install the same version on every node")
            if not a["entrypoint"]:
                say(f"megatrain {a['version']} there has no megatrain.{entrypoint} entrypoint")
            for p in a["missing"]:
                say(f"{p} not found: data and configs must be on a filesystem every node sees")
            if not a["checkpoint_writable"]:
                say(f"checkpoint dir {abs_ckpt} cannot be created or written there")
            if "port_busy" in a:
                say(f"master port {master_port} is taken ({a['port_busy']}): pass --master-port with a free one")
    return problems


# ------------------------------------------------------------------------------------------------------------ command

def deepspeed_command(hostfile: str, venv: str, master_addr: str, master_port: int, ssh_port: int | None,
                      entrypoint: str, args: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", hostfile,
           "--venv_script", os.path.join(venv, "bin", "activate"),
           "--master_addr", master_addr, "--master_port", str(master_port)]
    if ssh_port:
        cmd += ["--ssh_port", str(ssh_port)]
    return cmd + ["--module", f"megatrain.{entrypoint}"] + args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hostfile", required=True, help="`HOST slots=N` per node (see `megatrain hostfile`)")
    p.add_argument("--venv", default=None, help="the venv, at the same path on every node (default: the active one)")
    p.add_argument("--master-addr", default=None, help="rank 0's address as the other nodes reach it (default: first host)")
    p.add_argument("--master-port", type=int, default=29500, help="a free TCP port on the first host (default 29500)")
    p.add_argument("--ssh-port", type=int, default=None, help="ssh port when not 22 (or set Port in ~/.ssh/config)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra variable for every rank, written to .deepspeed_env (repeatable)")
    p.add_argument("--skip-preflight", action="store_true", help="launch without checking the hosts first")
    p.add_argument("--dry-run", action="store_true", help="run the preflight, print the command, launch nothing")
    p.add_argument("entrypoint", choices=ENTRYPOINTS, help="what to run on every rank: megatrain.<entrypoint>")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the entrypoint's own arguments (--config, --set ...)")


def command(args: argparse.Namespace) -> int:
    for flag, port in (("--master-port", args.master_port), ("--ssh-port", args.ssh_port)):
        if port is not None and not 1 <= port <= 65535:
            raise LaunchError(f"{flag} {port}: a TCP port is 1-65535")
    if args.master_addr is not None and not is_host_address(args.master_addr):
        raise LaunchError(f"--master-addr {args.master_addr!r}: not a host name or IP address; give rank 0's host as "
                          f"the other nodes reach it (default: the hostfile's first host)")
    hosts = parse_hostfile(args.hostfile)
    venv = os.path.abspath(args.venv or default_venv())
    entry_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    if importlib.util.find_spec(f"megatrain.{args.entrypoint}") is None:
        raise LaunchError(f"this megatrain has no megatrain.{args.entrypoint} entrypoint")
    first_host = next(iter(hosts))
    master_addr = args.master_addr or first_host
    if not args.skip_preflight:
        paths, ckpt = entrypoint_paths(args.entrypoint, entry_args)
        problems = preflight(list(hosts), venv, args.entrypoint, paths, ckpt, args.master_port, args.ssh_port)
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1
        print(f"preflight: {len(hosts)} host(s) ready ({', '.join(hosts)}): megatrain from {venv}, "
              f"paths visible, port {args.master_port} free on {first_host}", flush=True)
    variables, notices = collect_env(os.environ, args.env)
    cmd = deepspeed_command(os.path.abspath(args.hostfile), venv, master_addr, args.master_port, args.ssh_port,
                            args.entrypoint, entry_args)
    if args.dry_run:
        print("\n".join([*notices, *(f".deepspeed_env: {k}={v}" for k, v in variables.items()), shlex.join(cmd)]))
        return 0
    notices += write_deepspeed_env(".deepspeed_env", variables)
    for line in notices:
        print(f"megatrain launch: {line}", file=sys.stderr)
    print(f"wrote .deepspeed_env ({', '.join(variables) or 'nothing to forward'})\n{shlex.join(cmd)}", flush=True)
    os.execv(cmd[0], cmd)  # DeepSpeed's runner takes over (and handles Ctrl-C: it kills the remote ranks)
