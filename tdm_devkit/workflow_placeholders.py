"""Stand-in files under the names the example workflows use, so a server's combos list them (validation needs a
user's view: the files exist). Empty checkpoints are never loaded: tests swap checkpoint loaders for injectors."""

from __future__ import annotations

from pathlib import Path


def install_placeholders(base_directory: Path, files_by_folder: dict[str, list[str]]) -> None:
    for folder, names in files_by_folder.items():
        for name in names:
            path = Path(base_directory) / "models" / folder / name
            if path.exists():
                continue
            if folder == "diffusers":
                # a folder model; its index makes loaders list it (tests that run it copy a real tiny model here)
                path.mkdir(parents=True, exist_ok=True)
                (path / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline"}')
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
