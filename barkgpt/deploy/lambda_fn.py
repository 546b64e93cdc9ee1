"""The Lambda function with boto3: role, create-or-update (idempotent), publish, alias, URL, rollback.

Idempotence: the desired code (image URI) and configuration are compared with what the function
has; only differences are sent. When nothing differs and the alias already points at the newest
published version, the deploy changes nothing at all.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from barkgpt.deploy.aws import error_code
from barkgpt.errors import BarkError

TRUST_POLICY = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


def role_policy(bucket: str, prefix: str, secret_arn: str | None = None) -> dict:
    """Inline policy: write its own logs (what AWSLambdaBasicExecutionRole grants), read releases,
    and read the API key's secret when there is one."""
    releases = f"arn:aws:s3:::{bucket}/{prefix.strip('/')}/*" if prefix.strip("/") else f"arn:aws:s3:::{bucket}/*"
    statements = [
        {"Effect": "Allow", "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
         "Resource": "*"},
        {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": releases}]
    if secret_arn:
        action = "ssm:GetParameter" if secret_arn.startswith("arn:aws:ssm:") else "secretsmanager:GetSecretValue"
        statements.append({"Effect": "Allow", "Action": [action], "Resource": secret_arn})
    return {"Version": "2012-10-17", "Statement": statements}


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    role_arn: str
    image_uri: str
    memory_mb: int
    timeout_s: int
    ephemeral_mb: int
    architecture: str
    environment: dict[str, str] = field(default_factory=dict)
    alias: str = "live"
    url_auth_type: str = "AWS_IAM"
    description: str = ""


def ensure_role(iam, role_name: str, bucket: str, prefix: str, log=print, secret_arn: str | None = None) -> str:
    """The function's execution role: logs + read-only access to the release prefix (+ the key's secret)."""
    policy = role_policy(bucket, prefix, secret_arn)
    try:
        arn = iam.get_role(RoleName=role_name)["Role"]["Arn"]
    except Exception as err:
        if error_code(err) != "NoSuchEntity":
            raise
    else:
        try:
            current = iam.get_role_policy(RoleName=role_name, PolicyName="barkgpt-lambda")["PolicyDocument"]
        except Exception as err:
            if error_code(err) != "NoSuchEntity":
                raise
            current = None
        if current != policy:  # e.g. an API key secret was added since the role was made
            iam.put_role_policy(RoleName=role_name, PolicyName="barkgpt-lambda", PolicyDocument=json.dumps(policy))
            log(f"updated the policy of role {arn}")
        return arn
    arn = iam.create_role(RoleName=role_name, AssumeRolePolicyDocument=json.dumps(TRUST_POLICY),
                          Description="BarkGPT Lambda: CloudWatch logs and read access to released models")["Role"]["Arn"]
    iam.put_role_policy(RoleName=role_name, PolicyName="barkgpt-lambda", PolicyDocument=json.dumps(policy))
    log(f"created role {arn}")
    return arn


def desired_config(spec: FunctionSpec) -> dict:
    return {"Role": spec.role_arn, "MemorySize": spec.memory_mb, "Timeout": spec.timeout_s,
            "Environment": {"Variables": dict(spec.environment)},
            "EphemeralStorage": {"Size": spec.ephemeral_mb}, "Description": spec.description}


def config_diff(current: dict, spec: FunctionSpec) -> list[str]:
    """Names of configuration keys whose current value differs from the spec."""
    want = desired_config(spec)
    have = {"Role": current.get("Role"), "MemorySize": current.get("MemorySize"),
            "Timeout": current.get("Timeout"),
            "Environment": {"Variables": current.get("Environment", {}).get("Variables", {})},
            "EphemeralStorage": {"Size": current.get("EphemeralStorage", {}).get("Size", 512)},
            "Description": current.get("Description", "")}
    return sorted(k for k in want if want[k] != have[k])


def _retry_role_propagation(call, attempts: int = 10, delay_s: float = 3.0):
    """A new IAM role takes seconds to become assumable by Lambda; retry that one error."""
    for i in range(attempts):
        try:
            return call()
        except Exception as err:
            msg = str(err)
            if error_code(err) == "InvalidParameterValueException" and "cannot be assumed" in msg and i < attempts - 1:
                time.sleep(delay_s)
                continue
            raise


def ensure_function(lam, spec: FunctionSpec, log=print) -> list[str]:
    """Create the function or bring it to `spec`; returns what changed ([] = nothing)."""
    try:
        current = lam.get_function(FunctionName=spec.name)
    except Exception as err:
        if error_code(err) != "ResourceNotFoundException":
            raise
        _retry_role_propagation(lambda: lam.create_function(
            FunctionName=spec.name, PackageType="Image", Code={"ImageUri": spec.image_uri},
            Architectures=[spec.architecture], Publish=False, **desired_config(spec)))
        lam.get_waiter("function_active_v2").wait(FunctionName=spec.name)
        log(f"created function {spec.name}")
        return ["created"]
    config = current["Configuration"]
    if config.get("PackageType") != "Image":
        raise BarkError(f"function {spec.name} exists as a {config.get('PackageType')} package; BarkGPT deploys "
                        "container images: delete it or set deploy.function_name to a new name")
    changed = []
    if current.get("Code", {}).get("ImageUri") != spec.image_uri:
        lam.update_function_code(FunctionName=spec.name, ImageUri=spec.image_uri)
        lam.get_waiter("function_updated_v2").wait(FunctionName=spec.name)
        changed.append("code")
    diff = config_diff(config, spec)
    if diff:
        _retry_role_propagation(lambda: lam.update_function_configuration(FunctionName=spec.name,
                                                                          **desired_config(spec)))
        lam.get_waiter("function_updated_v2").wait(FunctionName=spec.name)
        changed += [f"config:{k}" for k in diff]
    if changed:
        log(f"updated function {spec.name}: {', '.join(changed)}")
    return changed


def published_versions(lam, name: str) -> list[str]:
    versions, marker = [], None
    while True:
        page = lam.list_versions_by_function(FunctionName=name, **({"Marker": marker} if marker else {}))
        versions += [v["Version"] for v in page["Versions"] if v["Version"] != "$LATEST"]
        marker = page.get("NextMarker")
        if not marker:
            return sorted(versions, key=int)


def alias_version(lam, name: str, alias: str) -> str | None:
    try:
        return lam.get_alias(FunctionName=name, Name=alias)["FunctionVersion"]
    except Exception as err:
        if error_code(err) == "ResourceNotFoundException":
            return None
        raise


def publish(lam, name: str, description: str) -> str:
    """Publish $LATEST; Lambda returns the newest version unchanged when nothing differs."""
    return lam.publish_version(FunctionName=name, Description=description[:256])["Version"]


def move_alias(lam, name: str, alias: str, version: str | None, log=print) -> str | None:
    """Point `alias` at `version` (None deletes it); returns the version it pointed at before."""
    previous = alias_version(lam, name, alias)
    if previous == version:
        return previous
    if version is None:
        lam.delete_alias(FunctionName=name, Name=alias)
        log(f"deleted alias {alias} (was version {previous})")
    elif previous is None:
        lam.create_alias(FunctionName=name, Name=alias, FunctionVersion=version)
        log(f"created alias {alias} -> version {version}")
    else:
        lam.update_alias(FunctionName=name, Name=alias, FunctionVersion=version)
        log(f"moved alias {alias}: version {previous} -> {version}")
    return previous


def ensure_url(lam, name: str, alias: str, auth_type: str, log=print) -> str:
    """A function URL on the alias (so moving the alias moves what the URL serves)."""
    try:
        cfg = lam.get_function_url_config(FunctionName=name, Qualifier=alias)
        if cfg["AuthType"] != auth_type:
            cfg = lam.update_function_url_config(FunctionName=name, Qualifier=alias, AuthType=auth_type)
            log(f"function URL auth type -> {auth_type}")
    except Exception as err:
        if error_code(err) != "ResourceNotFoundException":
            raise
        cfg = lam.create_function_url_config(FunctionName=name, Qualifier=alias, AuthType=auth_type)
        log(f"created function URL {cfg['FunctionUrl']} ({auth_type})")
    if auth_type == "NONE":
        # A public URL also needs a resource policy allowing anyone to invoke it.
        for sid, action, extra in (("FunctionURLPublicAccess", "lambda:InvokeFunctionUrl", {"FunctionUrlAuthType": "NONE"}),
                                   ("FunctionURLInvokeAllowPublicAccess", "lambda:InvokeFunction", {})):
            try:
                lam.add_permission(FunctionName=name, Qualifier=alias, StatementId=sid, Action=action,
                                   Principal="*", **extra)
            except Exception as err:
                if error_code(err) != "ResourceConflictException":
                    raise
    return cfg["FunctionUrl"]
