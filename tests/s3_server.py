"""A real S3 server for the tests: moto's standalone server (``moto[server]``) on 127.0.0.1, a free port.

Requests are authenticated like AWS's: the server holds one IAM user with an access key that may do
everything, and from then on any other key is refused (moto accepts any key until told otherwise).
"""

from __future__ import annotations

import json
import logging
import urllib.request
from dataclasses import dataclass


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    bucket: str
    access_key: str
    secret_key: str

    @property
    def env(self) -> dict:
        """What a process (driver, Ray worker, Serve replica) needs to reach the bucket."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def uri(self, prefix: str, bucket: str | None = None) -> str:
        return f"s3://{bucket or self.bucket}/{prefix.strip('/')}?endpoint_override={self.endpoint}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)


def start(bucket: str = "calm"):
    """Start the server; returns (server handle with .stop(), S3Server)."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access-log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    anyone = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup",
              "aws_secret_access_key": "setup"}
    iam = boto3.client("iam", **anyone)
    iam.create_user(UserName="calm")
    iam.put_user_policy(UserName="calm", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="calm")["AccessKey"]
    s3 = S3Server(endpoint, bucket, key["AccessKeyId"], key["SecretAccessKey"])
    s3.client().create_bucket(Bucket=bucket)
    # from now on every request must be signed with a key the server knows
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request, timeout=10).read()
    return server, s3


_SHARED = None


def shared(bucket: str = "calm"):
    """The one server of this process (started on first use, stopped at exit): moto keeps its IAM and its
    authentication switch in process-wide state, so after one server turned authentication on a second one could
    not create its user. Every test module that needs S3 shares this one. Returns the ``S3Server``."""
    global _SHARED
    if _SHARED is None:
        import atexit

        server, s3 = start(bucket)
        atexit.register(server.stop)
        _SHARED = s3
    return _SHARED
