"""Check for / create the test bucket on the local S3 server (used by up.sh).

Runs with the python of the seaweedfs venv in the test-env cache (it has boto3).
Exit 0 when the bucket exists (after creating it with --create).
"""

import argparse
import sys
import time

import boto3
import botocore.config
import botocore.exceptions


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--access-key", required=True)
    p.add_argument("--secret-key", required=True)
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--create", action="store_true", help="create the bucket if missing")
    p.add_argument("--check", action="store_true", help="only check that the bucket exists")
    p.add_argument("--wait", type=float, default=0, help="retry for this many seconds")
    a = p.parse_args()

    s3 = boto3.client(
        "s3",
        endpoint_url=a.endpoint,
        aws_access_key_id=a.access_key,
        aws_secret_access_key=a.secret_key,
        region_name=a.region,
        config=botocore.config.Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            connect_timeout=3,
            read_timeout=10,
        ),
    )
    deadline = time.monotonic() + a.wait
    while True:
        try:
            try:
                s3.head_bucket(Bucket=a.bucket)
                return 0
            except botocore.exceptions.ClientError as e:
                code = e.response.get("Error", {}).get("Code")
                if code not in ("404", "NoSuchBucket", "NotFound") or not a.create:
                    raise
            s3.create_bucket(Bucket=a.bucket)
            print(f"created bucket {a.bucket}")
            return 0
        except Exception as e:  # noqa: BLE001 - server may still be starting
            if time.monotonic() >= deadline:
                print(f"s3 bucket {a.bucket} at {a.endpoint}: {e}", file=sys.stderr)
                return 1
            time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
