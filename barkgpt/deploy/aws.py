"""Where the deploy goes: real AWS (credentials + region, optional AWS_ENDPOINT_URL) or a local
AWS API server (moto) started on a free loopback port when no AWS configuration exists.

Both paths make the same boto3 calls over HTTP; only the endpoint and credentials differ.
Credentials are checked (STS GetCallerIdentity) before anything is uploaded.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from barkgpt.errors import BarkError
from barkgpt.net import free_port

# Variables or files whose presence means "the user configured AWS"; none of them -> local server.
AWS_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_REGION",
                "AWS_DEFAULT_REGION", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
LOCAL_KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}  # moto accepts any


@dataclass
class AwsTarget:
    """A resolved place to deploy: a boto3 session, region, optional endpoint, and who we are."""

    session: object  # boto3.Session
    region: str
    endpoint_url: str | None
    local: bool
    account_id: str = ""
    caller_arn: str = ""
    started_s: float = 0.0  # time to start the local server, when there is one
    _clients: dict = field(default_factory=dict, repr=False)

    def client(self, service: str, **config):
        """A boto3 client for `service` at this target (cached unless `config` is given)."""
        from botocore.config import Config

        if config or service not in self._clients:
            cfg = Config(**{"retries": {"max_attempts": 4, "mode": "standard"}, "connect_timeout": 5,
                            "read_timeout": 60, **config})
            client = self.session.client(service, region_name=self.region, endpoint_url=self.endpoint_url,
                                         config=cfg)
            if config:
                return client
            self._clients[service] = client
        return self._clients[service]

    @property
    def emulated(self) -> bool:
        """The embedded server, or an AWS_ENDPOINT_URL (moto, LocalStack): an API that keeps state
        but runs no container images, so the image is not checked and the smoke test runs here."""
        return self.local or bool(self.endpoint_url)

    def describe(self) -> str:
        where = f"local AWS API at {self.endpoint_url}" if self.local else (
            f"AWS endpoint {self.endpoint_url}" if self.endpoint_url else "AWS")
        return f"{where} (region {self.region}, account {self.account_id})"


def aws_configured(env: dict | None = None) -> bool:
    """True when the environment or ~/.aws names any AWS configuration."""
    env = os.environ if env is None else env
    if any(env.get(name) for name in AWS_ENV_VARS):
        return True
    home = Path(env.get("HOME", "~")).expanduser()
    files = [env.get("AWS_SHARED_CREDENTIALS_FILE", home / ".aws" / "credentials"),
             env.get("AWS_CONFIG_FILE", home / ".aws" / "config")]
    return any(Path(f).expanduser().exists() for f in files)


class LocalAwsServer:
    """moto's AWS API server in a thread on a free loopback port; in-memory: state ends with it."""

    def __init__(self):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per request
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.stop()


def connect(endpoint_url: str | None, region: str | None, *, local: bool = False,
            credentials: dict | None = None) -> AwsTarget:
    """Build a session for an endpoint and prove the credentials work (before any upload)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    session = boto3.Session(**(credentials or {}), region_name=region)
    region = region or session.region_name
    if not region:
        raise BarkError("AWS credentials are set but no region is: set AWS_REGION (e.g. us-east-1) "
                        "or AWS_DEFAULT_REGION, or unset the AWS variables to deploy to the local AWS API")
    if session.get_credentials() is None:
        raise BarkError("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                        "(or AWS_PROFILE), or unset all AWS_* variables to deploy to the local AWS API")
    target = AwsTarget(session, region, endpoint_url, local)
    try:
        who = target.client("sts").get_caller_identity()
    except NoCredentialsError:
        raise BarkError("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                        "(or AWS_PROFILE)") from None
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        raise BarkError(f"AWS rejected the credentials ({code}: {err.response['Error'].get('Message', '')}); "
                        "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or AWS_PROFILE") from None
    except BotoCoreError as err:
        raise BarkError(f"cannot reach AWS at {endpoint_url or 'the default endpoint'} ({err}); "
                        "check the network or AWS_ENDPOINT_URL") from None
    target.account_id = who["Account"]
    target.caller_arn = who["Arn"]
    return target


@contextmanager
def aws_target(mode: str = "auto", default_region: str = "us-east-1"):
    """Yield an AwsTarget; in local mode a moto server runs only inside this block.

    mode: "auto" (local when no AWS configuration exists), "local", or "aws".
    """
    if mode not in ("auto", "local", "aws"):
        raise BarkError(f"deploy.target must be auto, local or aws; got {mode!r}")
    local = mode == "local" or (mode == "auto" and not aws_configured())
    if not local:
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
        region = (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                  or _profile_region() or (default_region if endpoint else None))  # emulators take any
        yield connect(endpoint, region)
        return
    started = time.perf_counter()
    server = LocalAwsServer()
    try:
        target = connect(server.endpoint_url, default_region, local=True, credentials=LOCAL_KEYS)
        target.started_s = time.perf_counter() - started
        yield target
    finally:
        server.stop()


def _profile_region() -> str | None:
    import boto3

    return boto3.Session().region_name


def error_code(err: Exception) -> str:
    response = getattr(err, "response", None) or {}
    return response.get("Error", {}).get("Code", "")
