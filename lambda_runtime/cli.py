"""`python -m lambda_runtime serve`: a local Lambda endpoint for a SAM template or one function.

Three steps, each testable alone: `parse_serve_args` (argv -> validated ServeOptions),
`load_functions` (options -> FunctionConfigs) and `run` (serve until SIGINT/SIGTERM).
"""

from __future__ import annotations

import argparse
import errno
import logging
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn, Protocol

from lambda_runtime import quotas
from lambda_runtime.config import FunctionConfig, ServiceSettings
from lambda_runtime.errors import ConfigError, IsolationUnavailable, LambdaRuntimeError
from lambda_runtime.template import load_template

PROG = "lambda-runtime"

# ServiceSettings / FunctionConfig field -> the flag that sets it (for error messages).
_SETTING_FLAGS = {
    "run_dir": "--run-dir",
    "account_concurrency": "--account-concurrency",
    "idle_timeout_s": "--idle-timeout",
    "clock": "--clock",
    "isolation": "--isolation",
    "host": "--host",
    "port": "--port",
}
_FUNCTION_FLAGS = {
    "name": "--function",
    "handler": "--handler",
    "code_dir": "--code-dir",
    "memory_mb": "--memory",
    "timeout_s": "--timeout",
    "ephemeral_mb": "--ephemeral",
    "environment": "--env",
    "efs": "--efs",
}


class UsageError(LambdaRuntimeError):
    """A command line argparse rejected; the message names the argument."""


class _Parser(argparse.ArgumentParser):
    # argparse prints usage and exits; we want one line and a status chosen by main().
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclass(frozen=True)
class FunctionFlags:
    """The single function given by --function/--handler/--code-dir/... (no template)."""

    name: str
    handler: str
    code_dir: Path
    memory_mb: int | None = None
    timeout_s: int | None = None
    ephemeral_mb: int | None = None
    environment: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServeOptions:
    """A validated `serve` command line: service settings plus where the functions come from."""

    settings: ServiceSettings
    template: Path | None = None
    parameters: Mapping[str, str] = field(default_factory=dict)
    efs: Mapping[str, Path] = field(default_factory=dict)
    function: FunctionFlags | None = None


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `lambda-runtime` and its `serve` command."""
    parser = _Parser(prog=PROG, description="A local AWS Lambda with Lambda's limits.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve the Lambda Invoke API for a template's functions or for one function",
        description="Serve the Lambda Invoke API (boto3-compatible) until SIGINT or SIGTERM.",
    )
    source = serve.add_argument_group("functions from a SAM / CloudFormation template")
    source.add_argument("--template", type=Path, metavar="FILE", help="template.yaml or .json")
    source.add_argument(
        "--parameter-overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="template parameter values (also ParameterKey=K,ParameterValue=V)",
    )
    single = serve.add_argument_group("one function without a template")
    single.add_argument("--function", metavar="NAME", help="function name")
    single.add_argument("--handler", metavar="MOD.FN", help="handler, e.g. app.handler")
    single.add_argument("--code-dir", type=Path, metavar="DIR", help="directory of the code")
    single.add_argument("--memory", type=_whole, metavar="MB", help="128-10240, default 128")
    single.add_argument("--timeout", type=_whole, metavar="S", help="1-900, default 3")
    single.add_argument("--ephemeral", type=_whole, metavar="MB", help="/tmp size, 512-10240")
    single.add_argument(
        "--env", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="env vars"
    )
    serve.add_argument(
        "--efs",
        action="append",
        default=[],
        metavar="/mnt/NAME=HOST_DIR",
        help="host directory standing in for the EFS file system mounted at /mnt/NAME",
    )
    service = serve.add_argument_group("service")
    service.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    service.add_argument("--port", type=_whole, default=9001, help="default 9001")
    service.add_argument("--run-dir", type=Path, default=Path("runs/serve"), metavar="DIR")
    service.add_argument(
        "--account-concurrency",
        type=_whole,
        default=quotas.ACCOUNT_CONCURRENCY_DEFAULT,
        metavar="N",
        help=f"default {quotas.ACCOUNT_CONCURRENCY_DEFAULT}",
    )
    service.add_argument(
        "--idle-timeout",
        type=_number,
        default=300.0,
        metavar="S",
        help="stop an environment idle this long (default 300)",
    )
    service.add_argument("--clock", choices=("lambda", "wall"), default="lambda")
    service.add_argument("--isolation", choices=("auto", "strict", "portable"), default="auto")
    return parser


def _pairs(flag: str, items: Sequence[str]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        sam = re.fullmatch(r"ParameterKey=([^,]+),ParameterValue=(.*)", item, re.DOTALL)
        key, sep, value = (sam.group(1), "=", sam.group(2)) if sam else item.partition("=")
        if not sep or not key:
            raise ConfigError(flag, f"must be KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def _efs_flags(items: Sequence[str]) -> dict[str, Path]:
    mounts: dict[str, Path] = {}
    for item in items:
        mount, sep, host = item.partition("=")
        if not sep or not host:
            raise ConfigError("--efs", f"must be /mnt/NAME=HOST_DIR, got {item!r}")
        if not re.fullmatch(quotas.EFS_MOUNT_PATH_PATTERN, mount):
            raise ConfigError("--efs", f"mount path must match /mnt/[a-zA-Z0-9-_.]+, got {mount!r}")
        if mount in mounts:
            raise ConfigError("--efs", f"{mount} is given twice")
        mounts[mount] = Path(host).expanduser()
    return mounts


def _renamed(error: ConfigError, flags: Mapping[str, str]) -> ConfigError:
    """`error` with its field replaced by the flag the user typed."""
    message = error.message
    if message.startswith(f"{error.field}: "):
        message = message[len(error.field) + 2 :]
    match = re.fullmatch(r"(\w+)\[(.*)\]", error.field)
    if match and match.group(1) in flags:
        key = match.group(2).strip("'\"")
        return ConfigError(f"{flags[match.group(1)]} {key}", message)
    return ConfigError(flags.get(error.field, error.field), message)


def parse_serve_args(argv: Sequence[str]) -> ServeOptions:
    """argv (without the program name) -> ServeOptions; raises UsageError or ConfigError."""
    args = build_parser().parse_args(list(argv))
    if args.command != "serve":
        raise UsageError("a command is required: serve")
    try:
        settings = ServiceSettings(
            run_dir=args.run_dir,
            account_concurrency=args.account_concurrency,
            idle_timeout_s=args.idle_timeout,
            clock=args.clock,
            isolation=args.isolation,
            host=args.host,
            port=args.port,
        )
    except ConfigError as exc:
        raise _renamed(exc, _SETTING_FLAGS) from exc
    efs = _efs_flags(args.efs)
    single_flags = {
        "--handler": args.handler,
        "--code-dir": args.code_dir,
        "--memory": args.memory,
        "--timeout": args.timeout,
        "--ephemeral": args.ephemeral,
        "--env": args.env or None,
    }
    if args.template is not None:
        if args.function is not None:
            raise ConfigError("--function", "give either --template or --function, not both")
        for flag, value in single_flags.items():
            if value is not None:
                raise ConfigError(flag, "only with --function; a --template defines its functions")
        if not args.template.is_file():
            raise ConfigError("--template", f"no such file: {str(args.template)!r}")
        parameters = _pairs("--parameter-overrides", args.parameter_overrides)
        return ServeOptions(settings, template=args.template, parameters=parameters, efs=efs)
    if args.function is None:
        raise ConfigError(
            "--template",
            "required: a template FILE, or --function NAME with --handler and --code-dir",
        )
    if args.parameter_overrides:
        raise ConfigError("--parameter-overrides", "only with --template")
    for flag in ("--handler", "--code-dir"):
        if single_flags[flag] is None:
            raise ConfigError(flag, f"is required with --function (see {PROG} serve --help)")
    function = FunctionFlags(
        name=args.function,
        handler=args.handler,
        code_dir=args.code_dir,
        memory_mb=args.memory,
        timeout_s=args.timeout,
        ephemeral_mb=args.ephemeral,
        environment=_pairs("--env", args.env),
    )
    return ServeOptions(settings, efs=efs, function=function)


def load_functions(options: ServeOptions, *, warn: IO[str] | None = None) -> list[FunctionConfig]:
    """The FunctionConfigs the options describe (template or single function), validated."""
    if options.function is not None:
        flags = options.function
        kwargs: dict[str, Any] = {
            "name": flags.name,
            "handler": flags.handler,
            "code_dir": flags.code_dir,
            "environment": dict(flags.environment),
            "efs": dict(options.efs),
        }
        for key in ("memory_mb", "timeout_s", "ephemeral_mb"):
            if getattr(flags, key) is not None:
                kwargs[key] = getattr(flags, key)
        try:
            return [FunctionConfig(**kwargs)]
        except ConfigError as exc:
            raise _renamed(exc, _FUNCTION_FLAGS) from exc
    assert options.template is not None
    settings = options.settings
    try:
        functions = load_template(
            options.template,
            parameters=options.parameters,
            efs_dirs=options.efs,
            region=settings.region,
            account_id=settings.account_id,
            cache_dir=settings.run_dir / "code",
            destinations_dir=settings.run_dir / "destinations",
        )
    except ConfigError as exc:
        raise ConfigError(f"--template {options.template}: {exc.field}", _bare(exc)) from exc
    if not functions:
        raise ConfigError(
            "--template",
            f"{options.template} defines no AWS::Serverless::Function or AWS::Lambda::Function",
        )
    used = {mount for cfg in functions for mount in cfg.efs}
    for mount in sorted(set(options.efs) - used):
        print(
            f"{PROG}: warning: --efs {mount} is not used by any function", file=warn or sys.stderr
        )
    return functions


def _bare(error: ConfigError) -> str:
    prefix = f"{error.field}: "
    return error.message[len(prefix) :] if error.message.startswith(prefix) else error.message


class Service(Protocol):
    """What `run` needs of lambda_runtime.service.LambdaService."""

    def register(self, cfg: FunctionConfig) -> None: ...

    def start_http(self, host: str = ..., port: int = ...) -> str: ...

    def mechanisms(self, name: str) -> dict[str, str]: ...

    def close(self) -> None: ...


def make_service(settings: ServiceSettings) -> Service:
    """The real local Lambda service for these settings."""
    from lambda_runtime.service import LambdaService

    return LambdaService(
        run_dir=settings.run_dir,
        account_concurrency=settings.account_concurrency,
        idle_timeout_s=settings.idle_timeout_s,
        clock=settings.clock,
        isolation=settings.isolation,
        # A service that already listens from its constructor must listen where we were told.
        host=settings.host,
        port=settings.port,
    )


def describe(cfg: FunctionConfig, mechanisms: Mapping[str, str]) -> str:
    """One line about a served function: name, limits, EFS and enforcement mechanisms."""
    line = (
        f"  {cfg.name}: {cfg.memory_mb} MB, timeout {cfg.timeout_s} s, /tmp {cfg.ephemeral_mb} MB"
    )
    for mount, host in cfg.efs.items():
        line += f", EFS {mount} -> {host}"
    if mechanisms:
        line += "; " + ", ".join(f"{key}={value}" for key, value in mechanisms.items())
    return line


def run(
    options: ServeOptions,
    functions: Sequence[FunctionConfig],
    *,
    out: IO[str] | None = None,
    service_factory: Callable[[ServiceSettings], Service] = make_service,
    stop: threading.Event | None = None,
) -> int:
    """Register the functions, serve until SIGINT/SIGTERM (or `stop`), then close everything."""
    out = out or sys.stdout
    stop = stop or threading.Event()
    # Handlers go in first: a signal during start-up must still end in close(), not a bare kill.
    previous = _install_stop_handlers(stop)
    host, port = options.settings.host, options.settings.port
    try:
        try:
            service = service_factory(options.settings)
        except OSError as exc:
            problem = _listen_problem(exc, host, port)
            if problem is None:
                raise
            raise problem from exc
        try:
            for cfg in functions:
                service.register(cfg)
            try:
                endpoint = service.start_http(host=host, port=port)
            except OSError as exc:
                problem = _listen_problem(exc, host, port)
                if problem is None:
                    raise
                raise problem from exc
            print(f"Lambda endpoint: {endpoint}", file=out)
            for cfg in functions:
                print(describe(cfg, service.mechanisms(cfg.name)), file=out)
            out.flush()
            while not stop.wait(0.2):  # short waits keep the main thread responsive to signals
                pass
        finally:
            service.close()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def _listen_problem(error: OSError, host: str, port: int) -> ConfigError | None:
    """The flag to blame when the HTTP server cannot listen; None for other OS errors."""
    if isinstance(error, IsolationUnavailable):
        return None
    if isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL:
        return ConfigError("--host", f"cannot listen on {host!r}: {error.strerror or error}")
    if error.errno in (errno.EADDRINUSE, errno.EACCES):
        return ConfigError("--port", f"cannot listen on {host}:{port}: {error.strerror}")
    return None


def _install_stop_handlers(stop: threading.Event) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}  # signals only reach the main thread; a caller elsewhere uses `stop`

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    return {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m lambda_runtime`; returns the exit status."""
    try:
        options = parse_serve_args(sys.argv[1:] if argv is None else argv)
        logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s %(message)s")
        functions = load_functions(options)
        return run(options, functions)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except IsolationUnavailable as exc:
        print(f"{PROG}: error: --isolation: {exc}", file=sys.stderr)
        return 2
    except LambdaRuntimeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # not the user's flags: the host refused something
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
