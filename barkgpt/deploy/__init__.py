"""Deployment: a release on S3 (files, then a manifest) served by an AWS Lambda function.

`deploy_pipeline` runs the whole step; `barkgpt.deploy.lambda_handler.handler` is the function's
entry point. Real AWS and the local AWS API server (moto) get the same boto3 calls.
"""
