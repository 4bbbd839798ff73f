"""Fixtures every test uses: the real ComfyUI runtime on the CPU, twin tiny models, a live ComfyUI server."""

from __future__ import annotations

import os

import pytest

from tdm_devkit import comfy_runtime

# Before anything imports `comfy`: CPU mode, ComfyUI first on sys.path.
comfy_runtime.bootstrap()


def _share_the_cores_among_workers() -> None:
    """Under pytest-xdist (scripts/test.sh runs the suite in parallel workers), each worker and every server or
    subprocess it starts gets its share of the cores: torch's default of one thread per core in every process
    oversubscribes the machine, and the tiny models here are faster on fewer threads anyway."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the servers and subprocesses this worker starts
    import torch

    torch.set_num_threads(threads)


_share_the_cores_among_workers()


class _RepositoryRootIsNotATestPackage:
    """Collects the repository root as a plain folder.

    The root holds the pack's `__init__.py` (ComfyUI imports the folder as a package), so pytest would collect it as
    a test package and import that `__init__.py` itself, under the folder's name. A clone named `comfyui-tdm` (the
    README's own name, and the usual folder under custom_nodes) is no Python identifier: pytest then imports the file
    as a lone module and its relative imports fail, erroring every test. Even under a valid name it would load a
    second copy of the pack beside the one `comfy_runtime.load_pack()` loads. Nothing in the root is a test.
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if path.resolve() == comfy_runtime.REPO_ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    # Registered as a plugin, not written as a hook of this conftest: conftest hooks only see paths at or below
    # tests/, and the root folder is collected before them.
    config.pluginmanager.register(_RepositoryRootIsNotATestPackage(), "tdm-repository-root")


def pytest_report_header(config):
    return f"ComfyUI {comfy_runtime.comfyui_version()} from {comfy_runtime.comfyui_dir()}"


@pytest.fixture(scope="session")
def pack():
    """This repository imported as ComfyUI imports a custom-node pack."""
    return comfy_runtime.load_pack()


@pytest.fixture(scope="session")
def sd15_twin():
    from tdm_devkit import twins

    return twins.sd15_twin(seed=0)


@pytest.fixture(scope="session")
def sd3_twin():
    from tdm_devkit import twins

    return twins.sd3_twin(seed=0)


@pytest.fixture(scope="session")
def sd35_twin():
    from tdm_devkit import twins

    return twins.sd3_twin(seed=0, sd35=True)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One live ComfyUI server for the session (start-up costs seconds); tests keep their files apart by name."""
    from tdm_devkit.server import ComfyServer, make_base_directory

    base = make_base_directory(tmp_path_factory.mktemp("comfy_base"))
    server = ComfyServer(base)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For a module of small-matrix tests: one thread is faster, and on a shared 2-core machine more threads
    contend (and a result summed on 1 thread is the same whatever the machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
