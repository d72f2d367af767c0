"""Real key holders on loopback for the key source tests and benchmarks: moto's KMS server
in a subprocess and a SoftHSM2 token initialised in a private directory."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

SOFTHSM_MODULE_PATHS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
)
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class MotoKms:
    """moto_server on 127.0.0.1: a real HTTP KMS API that botocore talks to as in
    production, through an endpoint URL."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        script = Path(sys.executable).with_name("moto_server")
        argv = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
        self.process = subprocess.Popen(
            [*argv, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("moto_server exited at start") from None
                time.sleep(0.1)
        raise RuntimeError("moto_server did not answer within 30 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def client(self) -> Any:
        import botocore.session

        session = botocore.session.Session()
        return session.create_client(
            "kms",
            region_name="us-east-1",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def create_key(self, alias: str | None = None) -> str:
        kms = self.client()
        key_id: str = kms.create_key(Description="integrations test")["KeyMetadata"]["KeyId"]
        if alias is not None:
            kms.create_alias(AliasName=alias, TargetKeyId=key_id)
        return key_id

    def source(self, key: str) -> str:
        return f"aws-kms:{key}?region=us-east-1&endpoint={self.endpoint}"


def softhsm_module() -> str | None:
    return next((p for p in SOFTHSM_MODULE_PATHS if os.path.exists(p)), None)


class SoftHsm:
    """A SoftHSM2 token in ``directory`` (its own SOFTHSM2_CONF), holding an AES
    key-encryption key that cannot be extracted."""

    def __init__(self, directory: Path, *, label: str = "integrations", pin: str = "1234") -> None:
        module = softhsm_module()
        if module is None or shutil.which("softhsm2-util") is None:
            raise RuntimeError("SoftHSM2 is not installed: apt-get install softhsm2")
        self.module = module
        self.label = label
        self.pin = pin
        tokens = directory / "tokens"
        tokens.mkdir(parents=True)
        self.conf = directory / "softhsm2.conf"
        self.conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )
        os.environ["SOFTHSM2_CONF"] = str(self.conf)
        subprocess.run(
            [
                "softhsm2-util",
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                "0000",
                "--pin",
                pin,
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
        )

    def create_kek(self, name: str = "kek") -> None:
        import pkcs11
        from pkcs11 import Attribute, KeyType

        from integrations._keysource import _PKCS11_LIBS

        lib = _PKCS11_LIBS.get(self.module)
        if lib is None:
            lib = _PKCS11_LIBS[self.module] = pkcs11.lib(self.module)
        lib.reinitialize()
        token = lib.get_token(token_label=self.label)
        with token.open(user_pin=self.pin, rw=True) as session:
            session.generate_key(
                KeyType.AES,
                256,
                label=name,
                store=True,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
            )

    def source(self, name: str = "kek", *, pin: str | None = None) -> str:
        return (
            f"pkcs11:token={self.label};object={name}"
            f"?module-path={self.module}&pin-value={pin or self.pin}"
        )
