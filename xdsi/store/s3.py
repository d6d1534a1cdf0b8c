"""Blob store in an S3-compatible object store (Amazon S3, SeaweedFS, …).

Blobs are objects in one bucket, named as in the local store. A put is a
streamed multipart upload from the spooled file, so no blob is ever whole in
memory; a read streams the object's body. An object appears only when its
upload completes, so a reader never sees a partial blob.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import BinaryIO, cast

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from xdsi.store.blobs import relative_path

logger = logging.getLogger(__name__)

# Parts of 8 MiB, at most four in flight: memory stays near 32 MiB per
# upload whatever the document size.
PART_SIZE = 8 * 1024 * 1024
TRANSFER = TransferConfig(
    multipart_threshold=PART_SIZE,
    multipart_chunksize=PART_SIZE,
    max_concurrency=4,
)


class S3CredentialsMissing(ValueError):
    """Neither the configuration nor the environment names S3 credentials."""


def credentials(access_key_id: str, secret_access_key: str) -> tuple[str, str, str]:
    """Return the access key, secret and session token to use.

    Configured values win; else the standard AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN variables.

    Limitation: boto3's other credential sources (shared files, instance
    metadata) are not consulted, so that no request ever leaves for a
    metadata address.
    """
    key = access_key_id or os.environ.get("AWS_ACCESS_KEY_ID", "")
    secret = secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    if not key or not secret:
        raise S3CredentialsMissing(
            "the S3 blob store needs [repository] s3_access_key_id and "
            "s3_secret_access_key, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    token = "" if access_key_id else os.environ.get("AWS_SESSION_TOKEN", "")
    return key, secret, token


class S3BlobStore:
    """Objects in one bucket of an S3-compatible store, with a local spool."""

    def __init__(
        self,
        *,
        endpoint_url: str,
        bucket: str,
        region: str,
        access_key_id: str,
        secret_access_key: str,
        spool: Path,
    ) -> None:
        key, secret, token = credentials(access_key_id, secret_access_key)
        self.bucket = bucket
        self.spool = spool
        self.spool.mkdir(parents=True, exist_ok=True)
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=region,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            aws_session_token=token or None,
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=10,
                read_timeout=120,
                retries={"max_attempts": 3, "mode": "standard"},
            ),
        )

    def put_file(self, key: str, source: Path, *, move: bool = True) -> str:
        """Upload ``source`` under ``key`` and return the object's name.

        With ``move`` the source file is removed once the object is
        complete.
        """
        name = relative_path(key)
        self.client.upload_file(str(source), self.bucket, name, Config=TRANSFER)
        if move:
            source.unlink(missing_ok=True)
        logger.debug("stored %s in bucket %s", name, self.bucket)
        return name

    def put_bytes(self, key: str, data: bytes) -> str:
        name = relative_path(key)
        self.client.put_object(Bucket=self.bucket, Key=name, Body=data)
        return name

    def open(self, relative: str) -> BinaryIO:
        """Start a GET of the object; its body streams as it is read."""
        reply = self.client.get_object(Bucket=self.bucket, Key=relative)
        return cast(BinaryIO, reply["Body"])

    def size(self, relative: str) -> int | None:
        """The object's Content-Length by HeadObject; None when it is gone."""
        try:
            reply = self.client.head_object(Bucket=self.bucket, Key=relative)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return None
            raise
        return int(reply["ContentLength"])

    def delete(self, relative: str) -> None:
        # S3 DeleteObject answers success for a key that is already gone.
        self.client.delete_object(Bucket=self.bucket, Key=relative)
