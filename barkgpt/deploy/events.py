"""Lambda events as AWS sends them: a function URL request (payload format 2.0, the same shape
API Gateway HTTP APIs send) and an API Gateway REST API request (payload format 1.0)."""
from __future__ import annotations

import json
import time
import uuid


def function_url_event(method: str, path: str, body: dict | None = None, *, url_id: str = "barkgptlocal",
                       region: str = "us-east-1", account_id: str = "123456789012",
                       headers: dict | None = None, query: str = "") -> dict:
    """A function URL invocation event (payload format version 2.0)."""
    now = time.time()
    domain = f"{url_id}.lambda-url.{region}.on.aws"
    hdrs = {"host": domain, "user-agent": "barkgpt-smoke", "x-forwarded-proto": "https",
            "x-forwarded-port": "443", "x-forwarded-for": "127.0.0.1"}
    if body is not None:
        hdrs["content-type"] = "application/json"
    hdrs.update({k.lower(): v for k, v in (headers or {}).items()})
    event = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": hdrs,
        "requestContext": {
            "accountId": account_id,
            "apiId": url_id,
            "domainName": domain,
            "domainPrefix": url_id,
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1",
                     "userAgent": "barkgpt-smoke"},
            "requestId": str(uuid.uuid4()),
            "routeKey": "$default",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": False,
    }
    if body is not None:
        event["body"] = json.dumps(body)
    return event


def api_gateway_v1_event(method: str, path: str, body: dict | None = None, *, stage: str = "prod") -> dict:
    """An API Gateway REST API proxy event (payload format version 1.0)."""
    headers = {"Host": "abc123.execute-api.us-east-1.amazonaws.com", "User-Agent": "barkgpt-smoke"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    return {
        "resource": "/{proxy+}",
        "path": path,
        "httpMethod": method,
        "headers": headers,
        "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "pathParameters": {"proxy": path.lstrip("/")},
        "stageVariables": None,
        "requestContext": {"resourcePath": "/{proxy+}", "httpMethod": method, "path": f"/{stage}{path}",
                           "stage": stage, "requestId": str(uuid.uuid4()), "accountId": "123456789012",
                           "identity": {"sourceIp": "127.0.0.1", "userAgent": "barkgpt-smoke"}},
        "body": json.dumps(body) if body is not None else None,
        "isBase64Encoded": False,
    }


def response_json(response: dict):
    """The JSON body of a Lambda proxy response (base64 bodies decoded)."""
    body = response.get("body") or ""
    if response.get("isBase64Encoded"):
        import base64

        body = base64.b64decode(body).decode()
    return json.loads(body) if body else None
