"""Canal's redirect-rule resource type: the checked-in generated code is exactly what protoc produces."""

from __future__ import annotations

import subprocess
import sys

from canal.xds import canal_redirect_pb2

from tests.conftest import ROOT


def test_regenerating_the_redirect_proto_changes_nothing(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'xds'}",
            f"--python_out={tmp_path}",
            "canal_redirect.proto",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "canal_redirect_pb2.py").read_bytes() == (ROOT / "xds" / "canal_redirect_pb2.py").read_bytes()


def test_type_url_names_the_message():
    from canal.xds.types import REDIRECT as url

    assert url == "type.googleapis.com/" + canal_redirect_pb2.RedirectRule.DESCRIPTOR.full_name
