"""SAM / CloudFormation templates become the exact FunctionConfigs; every error names its field."""

from __future__ import annotations

import base64
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from lambda_runtime.errors import ConfigError
from lambda_runtime.template import Resolver, Unresolved, load_template, parse_template

TEMPLATE = """\
AWSTemplateFormatVersion: '2010-09-09'
Transform: AWS::Serverless-2016-10-31
Description: serverless training
Parameters:
  Stage:
    Type: String
    Default: dev
    AllowedValues: [dev, prod]
  TrainMemory:
    Type: Number
    Default: 2048
    MinValue: 128
  SharedTable:
    Type: String
Mappings:
  StageConfig:
    dev: {Timeout: 60, Retries: 1}
    prod: {Timeout: 900, Retries: 2}
Conditions:
  IsProd: !Equals [!Ref Stage, prod]
  IsDev: !Not [!Condition IsProd]
Globals:
  Function:
    Runtime: python3.11
    Timeout: 30
    MemorySize: 256
    Environment:
      Variables:
        STAGE: !Ref Stage
        LOG_LEVEL: INFO
Resources:
  FileSystem:
    Type: AWS::EFS::FileSystem
  AccessPoint:
    Type: AWS::EFS::AccessPoint
    Properties:
      FileSystemId: !Ref FileSystem
      PosixUser: {Uid: "1001", Gid: "1001"}
  FailureQueue:
    Type: AWS::SQS::Queue
  Train:
    Type: AWS::Serverless::Function
    Properties:
      FunctionName: !Sub "train-${Stage}"
      Handler: app.handler
      CodeUri: src/
      MemorySize: !Ref TrainMemory
      Timeout: !FindInMap [StageConfig, !Ref Stage, Timeout]
      EphemeralStorage:
        Size: 1024
      ReservedConcurrentExecutions: !If [IsProd, 50, !Ref AWS::NoValue]
      Architectures: [arm64]
      Environment:
        Variables:
          LOG_LEVEL: DEBUG
          WEIGHTS: !Sub "${Mount}/weights"
          ENDPOINT: !Sub "https://lambda.${AWS::Region}.${AWS::URLSuffix}"
          COMBINE_ARN: !GetAtt Combine.Arn
          QUEUE: !Join [":", [!Ref AWS::Partition, !Ref AWS::AccountId, !Ref FailureQueue]]
          BATCH: 8
          SHUFFLE: true
          TABLE: !Ref SharedTable
          BUCKET: !ImportValue shared-Bucket
      FileSystemConfigs:
        - Arn: !GetAtt AccessPoint.Arn
          LocalMountPath: /mnt/efs
      EventInvokeConfig:
        MaximumRetryAttempts: !FindInMap [StageConfig, !Ref Stage, Retries]
        MaximumEventAgeInSeconds: 3600
        DestinationConfig:
          OnFailure:
            Type: SQS
            Destination: !GetAtt FailureQueue.Arn
  Combine:
    Type: AWS::Lambda::Function
    Properties:
      Handler: index.handler
      Runtime: python3.12
      Role: !GetAtt CombineRole.Arn
      MemorySize: 512
      Code:
        ZipFile: |
          def handler(event, context):
              return {"combined": True}
      FileSystemConfigs:
        - Arn: !Ref AccessPoint
          LocalMountPath: /mnt/efs
  CombineRole:
    Type: AWS::IAM::Role
  CombineInvokeConfig:
    Type: AWS::Lambda::EventInvokeConfig
    Properties:
      FunctionName: !Ref Combine
      Qualifier: $LATEST
      MaximumRetryAttempts: 0
  DevOnly:
    Type: AWS::Serverless::Function
    Condition: IsDev
    Properties:
      Handler: app.dev
      CodeUri: src/
  Progress:
    Type: AWS::DynamoDB::Table
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "app.py").write_text("def handler(event, context):\n    return event\n")
    path = tmp_path / "template.yaml"
    path.write_text(TEMPLATE.replace("${Mount}", "/mnt/efs"))
    return path


def _load(path: Path, tmp_path: Path, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("efs_dirs", {"/mnt/efs": tmp_path / "efs"})
    configs = load_template(
        path, cache_dir=tmp_path / "cache", destinations_dir=tmp_path / "dest", **kwargs
    )
    return {config.name: config for config in configs}


def test_sam_function_resolves_globals_parameters_mappings_and_conditions(project, tmp_path):
    configs = _load(project, tmp_path)
    assert list(configs) == ["train-dev", "Combine", "DevOnly"]
    train = configs["train-dev"]
    assert train.handler == "app.handler"
    assert train.code_dir == (tmp_path / "src").resolve()
    assert train.runtime == "python3.11"  # from Globals
    assert train.memory_mb == 2048  # the function's !Ref beats Globals' 256
    assert train.timeout_s == 60
    assert train.ephemeral_mb == 1024
    assert train.reserved_concurrency is None  # !If [IsProd, 50, AWS::NoValue] on dev
    assert train.architecture == "arm64"
    assert dict(train.environment) == {
        "STAGE": "dev",
        "LOG_LEVEL": "DEBUG",
        "WEIGHTS": "/mnt/efs/weights",
        "ENDPOINT": "https://lambda.us-east-1.amazonaws.com",
        "COMBINE_ARN": "arn:aws:lambda:us-east-1:000000000000:function:Combine",
        "QUEUE": "aws:000000000000:FailureQueue",
        "BATCH": "8",
        "SHUFFLE": "true",
        "TABLE": "<unresolved Ref SharedTable>",
        "BUCKET": "<unresolved Fn::ImportValue shared-Bucket>",
    }
    assert dict(train.efs) == {"/mnt/efs": (tmp_path / "efs").resolve()}
    assert train.max_retry_attempts == 1
    assert train.max_event_age_s == 3600
    # The SQS destination (!GetAtt FailureQueue.Arn) becomes a local file of failure records.
    assert train.on_failure == tmp_path / "dest" / "FailureQueue.jsonl"


def test_lambda_function_with_inline_zipfile_and_event_invoke_config_resource(project, tmp_path):
    combine = _load(project, tmp_path)["Combine"]
    assert combine.handler == "index.handler"
    assert combine.code_dir.parent == (tmp_path / "cache").resolve()
    assert (combine.code_dir / "index.py").read_text() == (
        'def handler(event, context):\n    return {"combined": True}\n'
    )
    assert combine.runtime == "python3.12"
    assert combine.memory_mb == 512
    assert combine.timeout_s == 3  # no Globals for AWS::Lambda::Function
    assert combine.ephemeral_mb == 512
    assert dict(combine.environment) == {}
    assert dict(combine.efs) == {"/mnt/efs": (tmp_path / "efs").resolve()}
    assert combine.max_retry_attempts == 0  # from the AWS::Lambda::EventInvokeConfig resource
    assert combine.max_event_age_s == 21_600
    assert combine.on_failure is None
    # Same code twice lands in the same directory.
    assert _load(project, tmp_path)["Combine"].code_dir == combine.code_dir


def test_parameter_overrides_flip_conditions_and_mappings(project, tmp_path):
    configs = _load(project, tmp_path, parameters={"Stage": "prod", "SharedTable": "progress"})
    assert list(configs) == ["train-prod", "Combine"]  # DevOnly's condition is false
    train = configs["train-prod"]
    assert train.timeout_s == 900
    assert train.reserved_concurrency == 50
    assert train.max_retry_attempts == 2
    assert train.environment["TABLE"] == "progress"
    assert train.environment["STAGE"] == "prod"


def test_region_and_account_reach_pseudo_parameters(project, tmp_path):
    train = _load(project, tmp_path, region="eu-west-1", account_id="123456789012")["train-dev"]
    assert train.environment["ENDPOINT"] == "https://lambda.eu-west-1.amazonaws.com"
    assert train.environment["COMBINE_ARN"] == (
        "arn:aws:lambda:eu-west-1:123456789012:function:Combine"
    )


def test_json_template_with_long_form_intrinsics(tmp_path):
    (tmp_path / "code").mkdir()
    template = {
        "Parameters": {"Mem": {"Type": "Number", "Default": 1769}},
        "Resources": {
            "Fn": {
                "Type": "AWS::Lambda::Function",
                "Properties": {
                    "FunctionName": {"Fn::Join": ["-", ["fn", {"Ref": "AWS::Region"}]]},
                    "Handler": "h.main",
                    "Code": "code",
                    "MemorySize": {"Ref": "Mem"},
                    "Timeout": {"Fn::Select": [1, [5, 10, 15]]},
                    "Environment": {"Variables": {"B64": {"Fn::Base64": "hi"}}},
                },
            }
        },
    }
    path = tmp_path / "template.json"
    path.write_text(json.dumps(template))
    (config,) = load_template(path)
    assert config.name == "fn-us-east-1"
    assert config.code_dir == (tmp_path / "code").resolve()
    assert config.memory_mb == 1769
    assert config.timeout_s == 10
    assert config.environment["B64"] == base64.b64encode(b"hi").decode()


def test_yaml_loader_keeps_dates_as_strings_and_reads_short_forms():
    data = parse_template(
        "A: 2024-01-02\nB: !GetAtt Res.Attr.Deep\nC: !Sub [x, {y: 1}]\nD: !GetAZs ''\n"
    )
    assert data == {
        "A": "2024-01-02",
        "B": {"Fn::GetAtt": ["Res", "Attr.Deep"]},
        "C": {"Fn::Sub": ["x", {"y": 1}]},
        "D": {"Fn::GetAZs": ""},
    }


def test_yaml_loader_refuses_python_objects():
    with pytest.raises(ConfigError) as info:
        parse_template("A: !!python/object/apply:os.system ['true']\n")
    assert info.value.field == "template"
    assert "not valid YAML" in str(info.value)


def _resolver(**sections: Any) -> Resolver:
    return Resolver(sections, parameters={})


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ({"Fn::Sub": "${AWS::StackName}-${!Literal}"}, "local-${Literal}"),
        ({"Fn::Sub": ["${A}/${B}", {"A": "x", "B": {"Ref": "AWS::Region"}}]}, "x/us-east-1"),
        ({"Fn::Split": [",", "a,b,c"]}, ["a", "b", "c"]),
        ({"Fn::Select": ["0", {"Fn::Split": ["/", "p/q"]}]}, "p"),
        ({"Fn::Cidr": ["10.0.0.0/16", 2, 8]}, ["10.0.0.0/24", "10.0.1.0/24"]),
        ({"Fn::GetAZs": ""}, ["us-east-1a", "us-east-1b", "us-east-1c"]),
        ({"Fn::And": [{"Fn::Equals": [1, "1"]}, {"Fn::Equals": [True, "true"]}]}, True),
        ({"Fn::Or": [{"Fn::Equals": ["a", "b"]}, {"Fn::ImportValue": "x"}]}, None),
        ({"Fn::And": [{"Fn::Equals": ["a", "b"]}, {"Fn::ImportValue": "x"}]}, False),
        ({"Fn::GetAtt": ["Role", "Arn"]}, "arn:aws:iam::000000000000:role/Role"),
        (
            {"Fn::GetAtt": ["Ap", "Arn"]},
            "arn:aws:elasticfilesystem:us-east-1:000000000000:access-point/fsap-",
        ),
        ({"Ref": "Queue"}, "Queue"),
        ({"Fn::ToJsonString": {"a": [1]}}, '{"a":[1]}'),
    ],
)
def test_intrinsics(expression, expected):
    resolver = _resolver(
        Resources={
            "Role": {"Type": "AWS::IAM::Role"},
            "Ap": {"Type": "AWS::EFS::AccessPoint"},
            "Queue": {"Type": "AWS::SQS::Queue"},
        }
    )
    value = resolver.resolve(expression)
    if expected is None:
        assert isinstance(value, Unresolved)
    elif isinstance(expected, str) and expected.endswith("fsap-"):
        assert value.startswith(expected)
        assert len(value) == len(expected) + 17  # fsap- and 17 hex digits, like AWS's ids
    else:
        assert value == expected


def test_access_point_ref_and_getatt_agree():
    resolver = _resolver(Resources={"Ap": {"Type": "AWS::EFS::AccessPoint"}})
    assert resolver.resolve({"Ref": "Ap"}) == resolver.resolve({"Fn::GetAtt": ["Ap", "Arn"]})


def test_unresolvable_things_stay_opaque():
    resolver = _resolver(Resources={})
    for expression in (
        {"Ref": "Nope"},
        {"Fn::GetAtt": ["Nope", "Arn"]},
        {"Fn::ImportValue": "x"},
        {"Fn::FindInMap": ["M", "a", "b"]},
        {"Fn::If": ["NoSuchCondition", 1, 2]},
        {"Fn::Transform": {"Name": "AWS::Include"}},
    ):
        assert isinstance(resolver.resolve(expression), Unresolved), expression
    partial = resolver.resolve({"Fn::Sub": "a-${Nope}-${AWS::Region}"})
    assert isinstance(partial, Unresolved)
    assert partial.text == "a-${Nope}-us-east-1"
    assert "Nope" in partial.reason


def _error(
    tmp_path: Path, properties: str, *, kind: str = "AWS::Serverless::Function", **kw: Any
) -> str:
    (tmp_path / "src").mkdir(exist_ok=True)
    body = textwrap.indent(textwrap.dedent(properties), " " * 6)
    extra = kw.pop("extra", "")
    path = tmp_path / "template.yaml"
    path.write_text(
        "Parameters:\n  NoDefault:\n    Type: Number\n"
        f"Resources:\n  Train:\n    Type: {kind}\n    Properties:\n{body}{extra}"
    )
    with pytest.raises(ConfigError) as info:
        load_template(path, cache_dir=tmp_path / "cache", **kw)
    return str(info.value)


BASE = "Handler: app.handler\nCodeUri: src/\n"


@pytest.mark.parametrize(
    ("properties", "message"),
    [
        (
            BASE + "MemorySize: 20000\n",
            "Resources.Train.Properties.MemorySize: must be from 128 to 10240 MB, got 20000",
        ),
        (
            BASE + "Timeout: 901\n",
            "Resources.Train.Properties.Timeout: must be from 1 to 900 seconds, got 901",
        ),
        (
            BASE + "MemorySize: lots\n",
            "Resources.Train.Properties.MemorySize: must be a whole number of MB from 128 to "
            "10240, got 'lots'",
        ),
        (
            BASE + "EphemeralStorage: {Size: 100}\n",
            "Resources.Train.Properties.EphemeralStorage.Size: must be from 512 to 10240 MB, "
            "got 100",
        ),
        (
            BASE + "Runtime: nodejs20.x\n",
            "Resources.Train.Properties.Runtime: must be a Python runtime 'python3.x'",
        ),
        (
            BASE + "MemorySize: !ImportValue shared-Memory\n",
            "Resources.Train.Properties.MemorySize: cannot be resolved locally: "
            "Fn::ImportValue shared-Memory needs another deployed stack's export",
        ),
        (
            BASE + "Timeout: !Ref NoDefault\n",
            "Resources.Train.Properties.Timeout: cannot be resolved locally: parameter "
            "'NoDefault' has no Default; pass --parameter-overrides NoDefault=VALUE",
        ),
        (
            "Handler: app.handler\nCodeUri: s3://bucket/train.zip\n",
            "Resources.Train.Properties.CodeUri: s3://bucket/train.zip is not local code",
        ),
        (
            "Handler: app.handler\nCodeUri: {Bucket: bkt, Key: k.zip}\n",
            "Resources.Train.Properties.CodeUri: s3://bkt/k.zip is not local code",
        ),
        (
            "Handler: app.handler\nCodeUri: missing/\n",
            "Resources.Train.Properties.CodeUri: must be an existing directory",
        ),
        ("CodeUri: src/\n", "Resources.Train.Properties.Handler: is required"),
        (
            BASE + "Handler: nodots\n",
            "Resources.Train.Properties.Handler: must be 'module.function'",
        ),
        (
            BASE + "FunctionName: 'bad name'\n",
            "Resources.Train.Properties.FunctionName: must be 1-64 characters",
        ),
        (
            BASE + "Environment: {Variables: {bad-key: x}}\n",
            "Resources.Train.Properties.Environment.Variables.bad-key: names must start",
        ),
        (
            BASE + "Environment: {Variables: {AWS_REGION: x}}\n",
            "Resources.Train.Properties.Environment.Variables.AWS_REGION: is reserved by Lambda",
        ),
        (
            BASE + "Environment: {Variables: {LIST: [1, 2]}}\n",
            "Resources.Train.Properties.Environment.Variables.LIST: must be a string, number or "
            "boolean",
        ),
        (
            BASE + "Architectures: [x86_64, arm64]\n",
            "Resources.Train.Properties.Architectures: must be a list of exactly one of",
        ),
        (
            BASE + "Architectures: [sparc]\n",
            "Resources.Train.Properties.Architectures: must be 'x86_64' or 'arm64', got 'sparc'",
        ),
        (
            BASE + "ReservedConcurrentExecutions: -1\n",
            "Resources.Train.Properties.ReservedConcurrentExecutions: must be from 0 to",
        ),
        (
            BASE + "FileSystemConfigs: [{Arn: x, LocalMountPath: /mnt/efs}]\n",
            "Resources.Train.Properties.FileSystemConfigs[0].LocalMountPath: /mnt/efs needs a "
            "host directory to stand in for EFS; pass --efs /mnt/efs=HOST_DIR",
        ),
        (
            BASE + "FileSystemConfigs: [{Arn: x, LocalMountPath: /efs}]\n",
            "Resources.Train.Properties.FileSystemConfigs[0].LocalMountPath: must match "
            "/mnt/[a-zA-Z0-9-_.]+",
        ),
        (
            BASE + "EventInvokeConfig: {MaximumEventAgeInSeconds: 30}\n",
            "Resources.Train.Properties.EventInvokeConfig.MaximumEventAgeInSeconds: must be "
            "from 60 to 21600 seconds, got 30",
        ),
        (
            BASE + "EventInvokeConfig: {MaximumRetryAttempts: 3}\n",
            "Resources.Train.Properties.EventInvokeConfig.MaximumRetryAttempts: must be from "
            "0 to 2 retries, got 3",
        ),
        (
            BASE + "PackageType: Image\n",
            "Resources.Train.Properties.PackageType: must be 'Zip'",
        ),
    ],
)
def test_sam_errors_name_resource_and_property(tmp_path, properties, message):
    assert _error(tmp_path, properties).startswith(message)


@pytest.mark.parametrize(
    ("properties", "message"),
    [
        (
            "Handler: index.h\nCode: {S3Bucket: bkt, S3Key: code.zip}\n",
            "Resources.Train.Properties.Code: s3://bkt/code.zip is not local code",
        ),
        ("Handler: index.h\n", "Resources.Train.Properties.Code: is required"),
        (
            "Handler: index.h\nCode: {ZipFile: [not, text]}\n",
            "Resources.Train.Properties.Code.ZipFile: must be Python source text",
        ),
    ],
)
def test_lambda_function_code_errors(tmp_path, properties, message):
    assert _error(tmp_path, properties, kind="AWS::Lambda::Function").startswith(message)


def test_event_invoke_config_resource_error_names_that_resource(tmp_path):
    extra = (
        "  Cfg:\n    Type: AWS::Lambda::EventInvokeConfig\n    Properties:\n"
        "      FunctionName: !Ref Train\n      Qualifier: $LATEST\n      MaximumRetryAttempts: 5\n"
    )
    message = _error(tmp_path, BASE, extra=extra)
    assert (
        message
        == "Resources.Cfg.Properties.MaximumRetryAttempts: must be from 0 to 2 retries, got 5"
    )


def test_parameter_errors(tmp_path, project):
    with pytest.raises(ConfigError) as info:
        load_template(project, parameters={"Stage": "qa"}, efs_dirs={"/mnt/efs": tmp_path})
    assert str(info.value) == "Parameters.Stage: must be one of 'dev', 'prod', got 'qa'"
    with pytest.raises(ConfigError) as info:
        load_template(project, parameters={"Stgae": "prod"}, efs_dirs={"/mnt/efs": tmp_path})
    assert str(info.value).startswith("Parameters.Stgae: is not a parameter of the template")
    with pytest.raises(ConfigError) as info:
        load_template(project, parameters={"TrainMemory": "big"}, efs_dirs={"/mnt/efs": tmp_path})
    assert str(info.value) == "Parameters.TrainMemory: must be a number, got 'big'"


def test_duplicate_function_names(tmp_path):
    extra = "  Other:\n    Type: AWS::Serverless::Function\n    Properties:\n"
    extra += "      FunctionName: Train\n      Handler: app.h\n      CodeUri: src/\n"
    message = _error(tmp_path, BASE, extra=extra)
    assert message == (
        "Resources.Other.Properties.FunctionName: 'Train' is already the name of Resources.Train"
    )


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_template(tmp_path / "nope.yaml")
    assert info.value.field == "template"
    bad = tmp_path / "bad.yaml"
    bad.write_text("Resources: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_template(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("Description: nothing\n")
    with pytest.raises(ConfigError, match=r"^Resources: .* has no Resources section"):
        load_template(empty)


def test_zipped_code_uri_is_unpacked(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "code.zip", "w") as bundle:
        bundle.writestr("app.py", "def handler(e, c):\n    return 1\n")
    (tmp_path / "t.yaml").write_text(
        "Resources:\n  F:\n    Type: AWS::Serverless::Function\n    Properties:\n"
        "      Handler: app.handler\n      CodeUri: code.zip\n"
    )
    (config,) = load_template(tmp_path / "t.yaml", cache_dir=tmp_path / "cache")
    assert (Path(config.code_dir) / "app.py").read_text().startswith("def handler")
