"""Fixtures every test uses: the real ComfyUI runtime on the CPU, twin tiny models, a live ComfyUI server."""

from __future__ import annotations

import pytest

from harness import comfy_runtime

# Before anything imports `comfy`: CPU mode, ComfyUI first on sys.path.
comfy_runtime.bootstrap()


def pytest_report_header(config):
    return f"ComfyUI {comfy_runtime.comfyui_version()} from {comfy_runtime.comfyui_dir()}"


@pytest.fixture(scope="session")
def pack():
    """This repository imported as ComfyUI imports a custom-node pack."""
    return comfy_runtime.load_pack()


@pytest.fixture(scope="session")
def sd15_twin():
    from harness import twins

    return twins.sd15_twin(seed=0)


@pytest.fixture(scope="session")
def sd3_twin():
    from harness import twins

    return twins.sd3_twin(seed=0)


@pytest.fixture(scope="session")
def sd35_twin():
    from harness import twins

    return twins.sd3_twin(seed=0, sd35=True)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One live ComfyUI server for the session (start-up costs seconds); tests keep their files apart by name."""
    from harness.server import ComfyServer, make_base_directory

    base = make_base_directory(tmp_path_factory.mktemp("comfy_base"))
    server = ComfyServer(base)
    server.start()
    try:
        yield server
    finally:
        server.stop()
