"""The serving API key lives in AWS Secrets Manager or SSM Parameter Store, never in params.yaml.

params.yaml names only where it is (`deploy.api_key_secret`: a secret name or ARN, or
`ssm:<parameter name>`), so the key never reaches checkpoints (they embed params), MLflow params,
reports, the manifest or the function configuration. The function receives the reference
(BARKGPT_API_KEY_SECRET) and reads the key at cold start; the deploy's smoke test reads it the
same way to authenticate. `barkgpt deploy` stores $BARKGPT_API_KEY there first when it is set.
"""
from __future__ import annotations

from collections.abc import Callable

from barkgpt.deploy.aws import error_code
from barkgpt.errors import BarkError

ENV_API_KEY = "BARKGPT_API_KEY"
ENV_API_KEY_SECRET = "BARKGPT_API_KEY_SECRET"
SSM = "ssm:"

Clients = Callable[[str], object]  # service name -> boto3 client


def parse_ref(ref: str) -> tuple[str, str]:
    """("ssm", parameter name) or ("secretsmanager", secret name or ARN)."""
    if ref.startswith(SSM):
        return "ssm", ref[len(SSM):]
    return "secretsmanager", ref


def read_api_key(ref: str, clients: Clients) -> str:
    service, name = parse_ref(ref)
    try:
        if service == "ssm":
            value = clients("ssm").get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]
        else:
            value = clients("secretsmanager").get_secret_value(SecretId=name).get("SecretString")
    except Exception as err:
        raise BarkError(f"cannot read the API key from {ref} ({error_code(err) or type(err).__name__}); "
                        "create it (or set BARKGPT_API_KEY when deploying) and allow the function's role "
                        "to read it") from None
    if not value:
        raise BarkError(f"the API key in {ref} is empty; store a key there (docs/deploy.md, 'API key')")
    return value


def store_api_key(ref: str, value: str, clients: Clients, log=print) -> None:
    """Create or update the secret; unchanged values are not rewritten (no new secret version)."""
    service, name = parse_ref(ref)
    try:
        if read_api_key(ref, clients) == value:
            return
    except BarkError:
        pass  # not there yet
    if service == "ssm":
        clients("ssm").put_parameter(Name=name, Value=value, Type="SecureString", Overwrite=True)
    else:
        sm = clients("secretsmanager")
        try:
            sm.put_secret_value(SecretId=name, SecretString=value)
        except Exception as err:
            if error_code(err) != "ResourceNotFoundException":
                raise
            sm.create_secret(Name=name, SecretString=value, Description="BarkGPT serving API key")
    log(f"stored the API key from ${ENV_API_KEY} in {ref}")


def resource_arn(ref: str, clients: Clients, region: str, account_id: str) -> str:
    """The ARN the function's role must be allowed to read."""
    service, name = parse_ref(ref)
    if service == "ssm":
        return f"arn:aws:ssm:{region}:{account_id}:parameter/{name.lstrip('/')}"
    if name.startswith("arn:"):
        return name
    try:
        return clients("secretsmanager").describe_secret(SecretId=name)["ARN"]
    except Exception:  # not readable by the deployer: allow the name's ARN pattern (random suffix)
        return f"arn:aws:secretsmanager:{region}:{account_id}:secret:{name}-??????"
