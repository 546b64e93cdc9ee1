"""The stack's one-shot jobs, run by `barkgpt stack up` and by compose alike:

    python -m barkgpt.stack databases --url postgresql://user@host:port/postgres mlflow prefect optuna
    python -m barkgpt.stack buckets barkgpt-mlflow barkgpt-dvc

Both are idempotent: what exists is kept. Credentials come from the standard chains (PGPASSFILE or
PGPASSWORD; the AWS variables, profile or role)."""
from __future__ import annotations

import argparse
import sys


def create_databases(url: str, names: list[str]) -> None:
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(url.replace("+psycopg2", "", 1))  # SQLAlchemy's driver name is not libpq's
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    with conn.cursor() as cur:
        for name in names:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                print(f"database {name}: created")
            else:
                print(f"database {name}: exists")
    conn.close()


def create_buckets(names: list[str]) -> None:
    import boto3

    s3 = boto3.client("s3")
    have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for name in names:
        if name in have:
            print(f"bucket {name}: exists")
            continue
        region = s3.meta.region_name
        extra = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        s3.create_bucket(Bucket=name, **extra)
        print(f"bucket {name}: created")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m barkgpt.stack")
    sub = parser.add_subparsers(dest="job", required=True)
    p = sub.add_parser("databases", help="create PostgreSQL databases that do not exist")
    p.add_argument("--url", required=True, help="a database URL to connect with (no password: PGPASSFILE/PGPASSWORD)")
    p.add_argument("names", nargs="+")
    p = sub.add_parser("buckets", help="create S3 buckets that do not exist")
    p.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    if args.job == "databases":
        create_databases(args.url, args.names)
    else:
        create_buckets(args.names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
