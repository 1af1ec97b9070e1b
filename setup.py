"""Build hook: compile deploy/dsray.proto into the package deploy.proto_gen (generated, never committed).

Everything else about the package is in pyproject.toml. ``build_py`` runs in every install:
a wheel (``pip install .``, ``pip wheel .``) gets the generated modules in its build directory;
an editable install (``pip install -e .``) writes them into the source tree, where
``deploy/proto_gen/`` is ignored by git. Change the .proto, reinstall, and the code follows.

Generated code checks at import that grpcio and protobuf are at least as new as the
grpcio-tools that wrote it; pip builds with the newest grpcio-tools, so an environment holding
older ones is told to upgrade them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO = Path("deploy/dsray.proto")
GEN_PACKAGE = Path("deploy/proto_gen")
GEN_INIT = '"""Generated from deploy/dsray.proto by the build (setup.py): do not edit, do not commit."""\n'


def compile_protos(out_root: Path) -> None:
    """Write deploy/proto_gen/{__init__,dsray_pb2,dsray_pb2_grpc}.py(i) under ``out_root``.

    protoc names modules after the .proto's path below its include root, so the file is
    compiled from a staged copy at deploy/proto_gen/dsray.proto: the generated stub then
    imports ``deploy.proto_gen.dsray_pb2``, and no generated line is edited afterwards.
    """
    from importlib import resources

    from grpc_tools import protoc  # a build requirement (pyproject.toml [build-system])

    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as staging:
        staged = Path(staging) / GEN_PACKAGE / PROTO.name
        staged.parent.mkdir(parents=True)
        shutil.copyfile(ROOT / PROTO, staged)
        (out_root / GEN_PACKAGE).mkdir(parents=True, exist_ok=True)
        argv = [
            "grpc_tools.protoc",
            f"--proto_path={staging}",
            f"--proto_path={well_known}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(staged),
        ]
        if protoc.main(argv) != 0:
            raise RuntimeError(f"protoc could not compile {PROTO} (its messages are above; paths shown are a copy)")
    (out_root / GEN_PACKAGE / "__init__.py").write_text(GEN_INIT)


class BuildPyWithProtos(build_py):
    """``build_py`` that also generates the gRPC modules (into the source tree when editable)."""

    def run(self) -> None:
        super().run()
        compile_protos(ROOT if self.editable_mode else Path(self.build_lib))


setup(cmdclass={"build_py": BuildPyWithProtos})
