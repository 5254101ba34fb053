"""`python -m lambda_runtime serve`: flags, one-line errors (status 2), a real served invoke."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from lambda_runtime.cli import ServeOptions, load_functions, main, parse_serve_args, run
from lambda_runtime.config import FunctionConfig, ServiceSettings
from lambda_runtime.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

HANDLER = """\
import os


def handler(event, context):
    return {
        "echo": event,
        "function": context.function_name,
        "memory": context.memory_limit_in_mb,
        "greeting": os.environ["GREETING"],
    }
"""

TEMPLATE = """\
Transform: AWS::Serverless-2016-10-31
Parameters:
  Greeting:
    Type: String
    Default: hello
Globals:
  Function:
    Timeout: 10
Resources:
  Data:
    Type: AWS::EFS::AccessPoint
  Echo:
    Type: AWS::Serverless::Function
    Properties:
      Handler: app.handler
      CodeUri: fn/
      MemorySize: 256
      Environment:
        Variables:
          GREETING: !Sub "${Greeting} from ${AWS::Region}"
      FileSystemConfigs:
        - Arn: !Ref Data
          LocalMountPath: /mnt/data
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "fn").mkdir()
    (tmp_path / "fn" / "app.py").write_text(HANDLER)
    template = tmp_path / "template.yaml"
    template.write_text(TEMPLATE)
    return template


# -- parsing ------------------------------------------------------------------------------------


def test_template_mode_defaults(project):
    options = parse_serve_args(["serve", "--template", str(project)])
    assert options.template == project
    assert options.function is None
    assert options.settings == ServiceSettings(
        run_dir=Path("runs/serve"),
        account_concurrency=1000,
        idle_timeout_s=300.0,
        clock="lambda",
        isolation="auto",
        host="127.0.0.1",
        port=9001,
    )


def test_template_mode_flags(project, tmp_path):
    options = parse_serve_args(
        [
            "serve",
            "--template",
            str(project),
            "--parameter-overrides",
            "Greeting=hi there",
            "ParameterKey=Other,ParameterValue=a=b",
            "--efs",
            f"/mnt/data={tmp_path / 'efs'}",
            "--port",
            "0",
            "--host",
            "0.0.0.0",
            "--run-dir",
            str(tmp_path / "run"),
            "--account-concurrency",
            "8",
            "--idle-timeout",
            "2.5",
            "--clock",
            "wall",
            "--isolation",
            "portable",
        ]
    )
    assert dict(options.parameters) == {"Greeting": "hi there", "Other": "a=b"}
    assert dict(options.efs) == {"/mnt/data": tmp_path / "efs"}
    settings = options.settings
    assert (settings.port, settings.host, settings.run_dir) == (0, "0.0.0.0", tmp_path / "run")
    assert (settings.account_concurrency, settings.idle_timeout_s) == (8, 2.5)
    assert (settings.clock, settings.isolation) == ("wall", "portable")


def test_template_functions_are_loaded_with_overrides_and_efs(project, tmp_path):
    options = parse_serve_args(
        [
            "serve",
            "--template",
            str(project),
            "--parameter-overrides",
            "Greeting=hi",
            "--efs",
            f"/mnt/data={tmp_path / 'efs'}",
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    (echo,) = load_functions(options)
    assert (echo.name, echo.handler, echo.memory_mb, echo.timeout_s) == (
        "Echo",
        "app.handler",
        256,
        10,
    )
    assert echo.code_dir == (tmp_path / "fn").resolve()
    assert dict(echo.environment) == {"GREETING": "hi from us-east-1"}
    assert dict(echo.efs) == {"/mnt/data": (tmp_path / "efs").resolve()}


def test_single_function_mode(tmp_path, project):
    options = parse_serve_args(
        [
            "serve",
            "--function",
            "echo",
            "--handler",
            "app.handler",
            "--code-dir",
            str(tmp_path / "fn"),
            "--memory",
            "1769",
            "--timeout",
            "60",
            "--ephemeral",
            "2048",
            "--env",
            "GREETING=hey",
            "MODE=a=b",
            "--efs",
            f"/mnt/data={tmp_path / 'efs'}",
        ]
    )
    assert options.template is None
    (cfg,) = load_functions(options)
    assert cfg == FunctionConfig(
        name="echo",
        handler="app.handler",
        code_dir=tmp_path / "fn",
        memory_mb=1769,
        timeout_s=60,
        ephemeral_mb=2048,
        environment={"GREETING": "hey", "MODE": "a=b"},
        efs={"/mnt/data": tmp_path / "efs"},
    )


def test_single_function_defaults_are_lambdas(tmp_path, project):
    options = parse_serve_args(
        ["serve", "--function", "f", "--handler", "app.handler", "--code-dir", str(tmp_path / "fn")]
    )
    (cfg,) = load_functions(options)
    assert (cfg.memory_mb, cfg.timeout_s, cfg.ephemeral_mb) == (128, 3, 512)
    assert dict(cfg.environment) == {} and dict(cfg.efs) == {}


def test_unused_efs_mount_is_warned_about(project, tmp_path, capsys):
    options = parse_serve_args(
        [
            "serve",
            "--template",
            str(project),
            "--efs",
            f"/mnt/data={tmp_path / 'a'}",
            "--efs",
            f"/mnt/other={tmp_path / 'b'}",
        ]
    )
    load_functions(options)
    assert capsys.readouterr().err == (
        "lambda-runtime: warning: --efs /mnt/other is not used by any function\n"
    )


# -- errors through main(argv) ------------------------------------------------------------------


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err  # one clear line, no usage dump or traceback
    assert lines[0].startswith("lambda-runtime: error: ")
    return str(lines[0]).removeprefix("lambda-runtime: error: ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "a command is required: serve"),
        (["serve"], "--template: required: a template FILE, or --function NAME with --handler"),
        (["run"], "argument COMMAND: invalid choice: 'run'"),
        (["serve", "--port", "abc"], "argument --port: must be a whole number, got 'abc'"),
        (["serve", "--port", "70000"], "--port: must be from 0 to 65535"),
        (["serve", "--idle-timeout", "soon"], "argument --idle-timeout: must be a number of"),
        (["serve", "--idle-timeout", "-1"], "--idle-timeout: must be a positive number, got -1.0"),
        (["serve", "--account-concurrency", "0"], "--account-concurrency: must be from 1 to"),
        (["serve", "--clock", "cpu"], "argument --clock: invalid choice: 'cpu'"),
        (["serve", "--isolation", "none"], "argument --isolation: invalid choice: 'none'"),
        (["serve", "--bogus"], "unrecognized arguments: --bogus"),
        (["serve", "--template", "/nonexistent.yaml"], "--template: no such file"),
        (["serve", "--efs", "/data=/tmp/x"], "--efs: mount path must match /mnt/[a-zA-Z0-9-_.]+"),
        (["serve", "--efs", "/mnt/data"], "--efs: must be /mnt/NAME=HOST_DIR, got '/mnt/data'"),
        (["serve", "--function", "f", "--handler", "a.b"], "--code-dir: is required with"),
        (["serve", "--function", "f", "--code-dir", "."], "--handler: is required with"),
        (
            ["serve", "--function", "f", "--handler", "a.b", "--code-dir", ".", "--memory", "64"],
            "--memory: must be from 128 to 10240 MB, got 64",
        ),
        (
            ["serve", "--function", "f", "--handler", "a.b", "--code-dir", ".", "--timeout", "0"],
            "--timeout: must be from 1 to 900 seconds, got 0",
        ),
        (
            ["serve", "--function", "f", "--handler", "a.b", "--code-dir", ".", "--ephemeral", "1"],
            "--ephemeral: must be from 512 to 10240 MB, got 1",
        ),
        (
            ["serve", "--function", "f", "--handler", "a.b", "--code-dir", ".", "--env", "X"],
            "--env: must be KEY=VALUE, got 'X'",
        ),
        (
            ["serve", "--function", "f", "--handler", "a.b", "--code-dir", ".", "--env", "TZ=x"],
            "--env TZ: is reserved by Lambda and cannot be set",
        ),
        (
            ["serve", "--function", "f", "--handler", "nodot", "--code-dir", "."],
            "--handler: must be 'module.function'",
        ),
        (
            ["serve", "--function", "bad name", "--handler", "a.b", "--code-dir", "."],
            "--function: must be 1-64 characters",
        ),
        (
            ["serve", "--function", "f", "--handler", "a.b", "--code-dir", "/nonexistent"],
            "--code-dir: must be an existing directory",
        ),
        (
            [
                "serve",
                "--function",
                "f",
                "--handler",
                "a.b",
                "--code-dir",
                ".",
                "--parameter-overrides",
                "A=1",
            ],
            "--parameter-overrides: only with --template",
        ),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, argv, message):
    assert _fails(capsys, argv).startswith(message)


def test_function_flags_clash_with_template(capsys, project):
    assert _fails(capsys, ["serve", "--template", str(project), "--handler", "a.b"]) == (
        "--handler: only with --function; a --template defines its functions"
    )
    assert _fails(capsys, ["serve", "--template", str(project), "--function", "f"]) == (
        "--function: give either --template or --function, not both"
    )


def test_template_errors_name_the_field(capsys, project, tmp_path):
    assert _fails(capsys, ["serve", "--template", str(project)]) == (
        f"--template {project}: Resources.Echo.Properties.FileSystemConfigs[0].LocalMountPath: "
        "/mnt/data needs a host directory to stand in for EFS; pass --efs /mnt/data=HOST_DIR"
    )
    project.write_text(TEMPLATE.replace("MemorySize: 256", "MemorySize: 20000"))
    efs = f"/mnt/data={tmp_path / 'efs'}"
    assert _fails(capsys, ["serve", "--template", str(project), "--efs", efs]) == (
        f"--template {project}: Resources.Echo.Properties.MemorySize: "
        "must be from 128 to 10240 MB, got 20000"
    )
    assert _fails(
        capsys,
        ["serve", "--template", str(project), "--efs", efs, "--parameter-overrides", "Nope=1"],
    ).startswith(f"--template {project}: Parameters.Nope: is not a parameter of the template")
    empty = tmp_path / "empty.yaml"
    empty.write_text("Resources:\n  Q:\n    Type: AWS::SQS::Queue\n")
    assert _fails(capsys, ["serve", "--template", str(empty)]) == (
        f"--template: {empty} defines no AWS::Serverless::Function or AWS::Lambda::Function"
    )


def test_help_exits_0(capsys):
    assert main(["serve", "--help"]) == 0
    assert "--parameter-overrides" in capsys.readouterr().out


# -- running, with a stand-in service -----------------------------------------------------------


class FakeService:
    def __init__(self, settings: ServiceSettings, fail_listen: bool = False) -> None:
        self.settings = settings
        self.registered: list[FunctionConfig] = []
        self.closed = False
        self.fail_listen = fail_listen

    def register(self, cfg: FunctionConfig) -> None:
        self.registered.append(cfg)

    def start_http(self, host: str = "127.0.0.1", port: int = 9001) -> str:
        if self.fail_listen:
            raise OSError(98, "Address already in use")
        return f"http://{host}:{port}"

    def mechanisms(self, name: str) -> dict[str, str]:
        return {"memory": "cgroup", "tmp": "loop-ext4"}

    def close(self) -> None:
        self.closed = True


def _options(tmp_path: Path) -> tuple[ServeOptions, list[FunctionConfig]]:
    options = parse_serve_args(
        ["serve", "--function", "f", "--handler", "app.handler", "--code-dir", str(tmp_path)]
    )
    return options, load_functions(options)


def test_run_prints_endpoint_and_functions_then_closes_on_sigterm(tmp_path, capsys):
    options, functions = _options(tmp_path)
    services: list[FakeService] = []

    def factory(settings: ServiceSettings) -> FakeService:
        services.append(FakeService(settings))
        return services[-1]

    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    assert run(options, functions, service_factory=factory) == 0
    timer.join()
    (service,) = services
    assert service.registered == functions
    assert service.closed
    assert service.settings is options.settings
    assert capsys.readouterr().out == (
        "Lambda endpoint: http://127.0.0.1:9001\n"
        "  f: 128 MB, timeout 3 s, /tmp 512 MB; memory=cgroup, tmp=loop-ext4\n"
    )
    assert signal.getsignal(signal.SIGTERM) == before  # our handler is gone again


def test_run_stops_on_event_and_reports_busy_port(tmp_path):
    options, functions = _options(tmp_path)
    stop = threading.Event()
    stop.set()
    service = FakeService(options.settings)
    assert run(options, functions, service_factory=lambda s: service, stop=stop) == 0
    assert service.closed
    busy = FakeService(options.settings, fail_listen=True)
    with pytest.raises(
        ConfigError, match=r"^--port: cannot listen on 127\.0\.0\.1:9001: Address already in use$"
    ):
        run(options, functions, service_factory=lambda s: busy, stop=threading.Event())
    assert busy.closed


# -- end to end: a real server process, boto3, SIGTERM ------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _lines(stream: IO[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.mark.timeout(120)
@pytest.mark.parametrize("isolation", ["auto", "portable"])
def test_serve_end_to_end_with_boto3_and_sigterm(project, tmp_path, isolation):
    psutil = pytest.importorskip("psutil")
    boto3 = pytest.importorskip("boto3")
    port = _free_port()
    efs_dir = tmp_path / "efs"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lambda_runtime",
            "serve",
            "--template",
            str(project),
            "--parameter-overrides",
            "Greeting=hi",
            "--port",
            str(port),
            "--efs",
            f"/mnt/data={efs_dir}",
            "--run-dir",
            str(tmp_path / "run"),
            "--idle-timeout",
            "600",
            "--isolation",
            isolation,
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _lines(proc.stdout), _lines(proc.stderr)
    try:
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while not any(line.startswith("  Echo:") for line in seen):
            assert proc.poll() is None, f"serve exited {proc.returncode}: {_drain(err)}"
            assert time.monotonic() < deadline, f"no endpoint line; stdout {seen}, {_drain(err)}"
            with contextlib.suppress(queue.Empty):
                seen.append(out.get(timeout=0.5))
        endpoint = f"http://127.0.0.1:{port}"
        assert seen[0] == f"Lambda endpoint: {endpoint}\n"
        assert seen[1].startswith(
            f"  Echo: 256 MB, timeout 10 s, /tmp 512 MB, EFS /mnt/data -> {efs_dir.resolve()}; "
        )
        assert efs_dir.is_dir()

        client = boto3.client(
            "lambda",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="x",
        )
        response = client.invoke(FunctionName="Echo", Payload=json.dumps({"x": [1, 2]}).encode())
        assert response["StatusCode"] == 200
        assert "FunctionError" not in response
        assert json.loads(response["Payload"].read()) == {
            "echo": {"x": [1, 2]},
            "function": "Echo",
            "memory": "256",
            "greeting": "hi from us-east-1",
        }
        # The warm environment is a child process tree of the server; remember it before SIGTERM
        # (after the server exits its orphans would be re-parented and harder to find).
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "expected at least one execution-environment process"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, _drain(err)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], f"environment processes left behind: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _drain(lines: queue.Queue[str]) -> str:
    text = ""
    while True:
        try:
            text += lines.get_nowait()
        except queue.Empty:
            return text
