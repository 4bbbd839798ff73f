"""Hostile LoRA files: every value read from a file is validated, no file drives super-linear work, declared sizes are
checked before anything is inflated, and every refusal names the file and says what to do (issue 13)."""

from __future__ import annotations

import io
import json
import pickle
import struct
import time
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from tdm_core import lora as tdm_lora
from tdm_core import validation

A = "transformer.transformer_blocks.0.attn.to_q"
MODULE = "transformer_blocks.0.attn.to_q"


def _peft_tensors(rank: int = 4, width: int = 16, down=None, up=None) -> dict:
    return {f"{A}.lora_A.weight": torch.randn(rank, width) if down is None else down,
            f"{A}.lora_B.weight": torch.randn(width, rank) if up is None else up}


def _safetensors(path, tensors=None, metadata=None):
    save_file(tensors if tensors is not None else _peft_tensors(), str(path), metadata=metadata)
    return path


def _raw_safetensors(path, header: dict | str, data: bytes = b""):
    raw = header if isinstance(header, str) else json.dumps(header)
    blob = raw.encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _refused(path, *fragments):
    """Loading `path` raises a LoraFileError naming the file and containing every fragment, quickly."""
    started = time.monotonic()
    with pytest.raises(tdm_lora.LoraFileError) as error:
        tdm_lora.load_lora(path)
    elapsed = time.monotonic() - started
    message = str(error.value)
    assert f"'{path.name}'" in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert elapsed < 10, f"{path.name} took {elapsed:.1f} s to refuse"
    return message


# ---------------------------------------------------------------------------------------------------------------
# Class: regular expressions from a file (ReDoS)


@pytest.mark.parametrize("entry,key", [
    ("alpha_pattern", "(x+)+y"),
    ("alpha_pattern", "(a|aa)+$"),
    ("rank_pattern", "([a-z_.0-9]+)*!"),
    ("alpha_pattern", ".*to_q"),
    ("alpha_pattern", "transformer_blocks.[0-9].attn.to_q"),
])
def test_pattern_keys_that_are_regexes_are_refused_in_linear_time(tmp_path, entry, key):
    # A module name of 40 'x': `(x+)+y` against it is 2^40 steps for a backtracking regex engine.
    name = "x" * 40
    tensors = {f"transformer.{name}.lora_A.weight": torch.randn(2, 8),
               f"transformer.{name}.lora_B.weight": torch.randn(8, 2)}
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 2.0,
                                                     f"transformer.{entry}": {key: 4.0}})}
    path = _safetensors(tmp_path / "redos.safetensors", tensors, metadata)
    _refused(path, entry, "regular expression")


@pytest.mark.parametrize("key,expected", [
    (MODULE, 8.0),  # the exact module path
    ("attn.to_q", 8.0),  # a '.'-suffix of it (peft: `(.*\.)?(key)$`)
    ("to_q", 8.0),
    ("^" + MODULE, 8.0),  # anchored: the whole path
    ("^" + MODULE.replace(".", "\\.") + "$", 8.0),  # re.escape spelling, as to_peft writes it
    ("^attn.to_q", 2.0),  # anchored suffix: not the whole path, so no match (peft agrees)
    ("o_q", 2.0),  # not after a '.': no match
    ("attn.to_k", 2.0),
])
def test_literal_pattern_keys_match_like_peft(tmp_path, key, expected):
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 2.0,
                                                     "transformer.alpha_pattern": {key: 8.0}})}
    parsed = tdm_lora.load_lora(_safetensors(tmp_path / "pattern.safetensors", _peft_tensors(), metadata))
    assert parsed.modules[f"transformer.{MODULE}"].alpha == expected
    # the same result as peft's own regex rule, run here on our own (trusted) literal key
    from peft.utils.other import get_pattern_key

    assert (expected == 8.0) == (get_pattern_key([key], MODULE) == key)


# ---------------------------------------------------------------------------------------------------------------
# Class: declared sizes inflated (zip bomb, storage bombs)


def _zip_bomb(path, megabytes: int = 64):
    """A torch.save file whose data entry is re-stored DEFLATE-compressed: tiny on disk, `megabytes` in memory."""
    buffer = io.BytesIO()
    torch.save({f"{A}.lora_A.weight": torch.zeros(megabytes * 1024 * 256)}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    return path


def test_a_compressed_torch_zip_is_refused_before_it_inflates(tmp_path):
    path = _zip_bomb(tmp_path / "bomb.pt")
    assert path.stat().st_size < 1024 * 1024  # 64 MB of zeros in well under 1 MB
    _refused(path, "compressed", "crafted")


def test_a_zip_declaring_more_than_it_holds_is_refused(tmp_path):
    buffer = io.BytesIO()
    torch.save(_peft_tensors(), buffer)
    data = bytearray(buffer.getvalue())
    # central directory entries: signature PK\x01\x02, uncompressed size at offset 24 (4 bytes)
    at = data.rfind(b"PK\x01\x02")
    data[at + 24: at + 28] = struct.pack("<I", 0x7FFFFFF0)
    path = tmp_path / "liar.pt"
    path.write_bytes(bytes(data))
    _refused(path, "declares")


def _legacy(tensors) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensors, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def test_a_legacy_file_declaring_a_huge_storage_is_refused_before_allocation(tmp_path):
    data = _legacy({"lora_unet_x.lora_down.weight": torch.zeros(1 << 20)})
    numel = b"J" + struct.pack("<i", 1 << 20)  # BININT of the storage's element count
    assert data.count(numel) == 2  # the storage record, then the tensor's shape
    path = tmp_path / "storage_bomb.pt"
    # the storage record: ~8.5 GB of float32 declared, which torch would allocate before reading
    path.write_bytes(data.replace(numel, b"J" + struct.pack("<i", 0x7F000000), 1))
    _refused(path, "truncated", "declare")


# ---------------------------------------------------------------------------------------------------------------
# Class: damaged files give errors that name the file


def _kohya_sd() -> dict:
    return {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32),
            "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4),
            "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(4.0)}


@pytest.mark.parametrize("keep", [0.1, 0.3, 0.5, 0.9, 0.99])
def test_a_truncated_legacy_pt_names_the_file(tmp_path, keep):
    data = _legacy(_kohya_sd())
    path = tmp_path / "tdm_dreamshaper.pt"
    path.write_bytes(data[: int(len(data) * keep)])
    _refused(path, "download it again")


@pytest.mark.parametrize("keep", [0.2, 0.6, 0.95])
def test_a_truncated_zip_pt_names_the_file(tmp_path, keep):
    buffer = io.BytesIO()
    torch.save(_kohya_sd(), buffer)
    path = tmp_path / "cut.pt"
    path.write_bytes(buffer.getvalue()[: int(len(buffer.getvalue()) * keep)])
    _refused(path)


def test_the_intact_legacy_and_zip_files_read(tmp_path):
    (tmp_path / "legacy.pt").write_bytes(_legacy(_kohya_sd()))
    assert tdm_lora.load_lora(tmp_path / "legacy.pt").alpha == 4.0
    torch.save(_kohya_sd(), tmp_path / "zip.pt")
    assert tdm_lora.load_lora(tmp_path / "zip.pt").alpha == 4.0


def _entry(offsets, shape=(2, 2), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": offsets}


HEADERS = {
    "nested": ("[" * 100_000 + "]" * 100_000, "levels deep"),
    "nested-metadata": ('{"__metadata__": ' + "[" * 5000 + "]" * 5000 + "}", "levels deep"),
    "offset-1e400": ('{"w.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 1e400]}}',
                     "data_offsets"),
    "offset-float": ({"w.lora_A.weight": _entry([0, 16.0])}, "data_offsets"),
    "offset-negative": ({"w.lora_A.weight": _entry([-16, 0])}, "data_offsets"),
    "offset-reversed": ({"w.lora_A.weight": _entry([16, 0])}, "data_offsets"),
    "offset-huge": ({"w.lora_A.weight": _entry([0, 2**70], shape=(2**31, 2**31))}, "shape"),
    "size-mismatch": ({"w.lora_A.weight": _entry([0, 8])}, "declares shape"),
    "nan-literal": ('{"w.lora_A.weight": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 16]}}', "NaN"),
    "unknown-dtype": ({"w.lora_A.weight": _entry([0, 16], dtype="F128")}, "unknown dtype"),
    "metadata-not-text": ({"__metadata__": {"a": 1}}, "__metadata__"),
    "entry-not-object": ({"w.lora_A.weight": [1, 2]}, "no dtype"),
    "not-an-object": ("[1, 2, 3]", "JSON object"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_hostile_safetensors_headers_name_the_file(tmp_path, case):
    header, fragment = HEADERS[case]
    path = _raw_safetensors(tmp_path / f"{case}.safetensors", header, bytes(64))
    _refused(path, "is corrupt", fragment)


@pytest.mark.parametrize("layout", ["torch-zip", "torch-legacy", "protocol-0", "protocol-2"])
def test_a_code_pickle_renamed_safetensors_is_refused_as_code(tmp_path, layout):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    path = tmp_path / "innocent.safetensors"
    if layout == "torch-zip":
        torch.save({"x.alpha": Payload()}, path)
    elif layout == "torch-legacy":
        torch.save({"x.alpha": Payload()}, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps({"x.alpha": Payload()}, protocol=int(layout[-1])))
    _refused(path, "Refused", "names code")
    assert not marker.exists()


@pytest.mark.parametrize("down,up", [
    (torch.zeros(0, 16), torch.zeros(16, 0)),  # rank 0
    (torch.zeros(4, 0), torch.zeros(16, 4)),  # empty input
    (torch.ones(4, 16, dtype=torch.int32), torch.ones(16, 4, dtype=torch.int32)),  # not floating point
])
def test_degenerate_factors_are_refused(tmp_path, down, up):
    path = _safetensors(tmp_path / "degenerate.safetensors", _peft_tensors(down=down, up=up))
    _refused(path, "corrupt" if down.is_floating_point() else "not a LoRA")


# ---------------------------------------------------------------------------------------------------------------
# Class: non-finite values are refused, never applied


def _with_value(tensor: torch.Tensor, value: float) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[3] = value
    return tensor


@pytest.mark.parametrize("where,value", [
    ("down", float("nan")), ("up", float("inf")), ("up", float("-inf")), ("down", float("nan")),
])
def test_non_finite_factors_are_refused(tmp_path, where, value):
    tensors = _peft_tensors()
    key = f"{A}.lora_A.weight" if where == "down" else f"{A}.lora_B.weight"
    tensors[key] = _with_value(tensors[key], value)
    _refused(_safetensors(tmp_path / "nan.safetensors", tensors), "NaN or infinite", where)


def test_non_finite_factors_of_a_half_precision_pt_are_refused(tmp_path):
    tensors = {k: v.half() for k, v in _kohya_sd().items()}
    tensors["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"][0, 0] = float("inf")
    torch.save(tensors, tmp_path / "half.pt")
    _refused(tmp_path / "half.pt", "NaN or infinite")


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 1e30])
def test_non_finite_or_absurd_alpha_tensors_are_refused(tmp_path, alpha):
    tensors = _kohya_sd()
    tensors["lora_unet_mid_block_attentions_0_proj_in.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(tmp_path / "alpha.safetensors"))
    _refused(tmp_path / "alpha.safetensors", "alpha")


@pytest.mark.parametrize("metadata,fragment", [
    ({"lora_adapter_metadata": '{"transformer.r": 4, "transformer.lora_alpha": NaN}'}, "NaN"),
    ({"lora_adapter_metadata": '{"transformer.r": 4, "transformer.lora_alpha": Infinity}'}, "Infinity"),
    ({"lora_adapter_metadata": '{"transformer.r": 4, "transformer.lora_alpha": 1e400}'}, "finite"),
    ({"lora_adapter_metadata": '{"transformer.r": 4, "transformer.lora_alpha": "many"}'}, "number"),
    ({"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 2,
                                           "transformer.alpha_pattern": {MODULE: True}})}, "number"),
    ({"lora_adapter_metadata": "[" * 10_000 + "]" * 10_000}, "levels deep"),
    ({"lora_adapter_metadata": "[1, 2]"}, "JSON object"),
    ({"tdm.lora_strength": "nan"}, "tdm.lora_strength"),
    ({"tdm.lora_strength": "inf"}, "tdm.lora_strength"),
    ({"tdm.lora_strength": "-Infinity"}, "tdm.lora_strength"),
    ({"tdm.lora_strength": "1e400"}, "tdm.lora_strength"),
    ({"tdm.lora_strength": "strong"}, "tdm.lora_strength"),
    ({"tdm.lora_strength": "1e6"}, "tdm.lora_strength"),
])
def test_hostile_header_numbers_are_refused(tmp_path, metadata, fragment):
    path = _safetensors(tmp_path / "header.safetensors", _peft_tensors(), metadata)
    _refused(path, fragment)


def test_kohya_network_alpha_header_must_be_finite(tmp_path):
    tensors = {k: v for k, v in _kohya_sd().items() if not k.endswith(".alpha")}
    path = _safetensors(tmp_path / "kohya.safetensors", tensors, {"ss_network_alpha": "nan"})
    _refused(path, "ss_network_alpha")
    good = _safetensors(tmp_path / "kohya_ok.safetensors", tensors, {"ss_network_alpha": "2"})
    assert tdm_lora.load_lora(good).alpha == 2.0


# ---------------------------------------------------------------------------------------------------------------
# The validation layer itself


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e400, True, "3", None, [1], 10**30, -1, 2.5])
def test_numbers_are_typed_finite_and_in_range(value):
    with pytest.raises(validation.ValidationError, match="iterations"):
        validation.number(value, "iterations", lo=1, hi=1_000_000, integer=True)


def test_good_numbers_pass():
    assert validation.number(3.0, "n", lo=1, hi=5, integer=True) == 3
    assert validation.number(2, "x", lo=0, hi=5) == 2.0
    assert validation.number_text(" 0.125 ", "s", lo=-1, hi=1) == 0.125


@pytest.mark.parametrize("name", ["CON", "nul", "Com1", "LPT9", "aux.safetensors", "con.tar", "name.", "name ",
                                  "a/PRN", "x" * 101, ".hidden", "..", "a\x00b", "/abs", "C:x", "a\\b", ""])
def test_names_refuse_device_names_trailing_dots_and_escapes(name):
    with pytest.raises(validation.ValidationError):
        validation.relative_name(name, "output name")


def test_confinement_resolves_symlinks(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    assert validation.confined(root, "sub/x", "name") == (root / "sub" / "x").resolve()
    for bad in ("link/x", "../outside/x", "sub/../../outside"):
        with pytest.raises(validation.ValidationError):
            validation.confined(root, bad, "name", lexical=True)


def test_crafted_module_names_cost_linear_time(tmp_path):
    # `blocks.1` repeated without the final '.<part>' made the old `^.*(?:blocks|...)\.\d+\.` regex backtrack
    # quadratically; names are now bounded and split, never backtracked over.
    crafted = ("blocks." + "1" * 30) * 30
    tensors = {f"transformer.{crafted[:1000 - 40]}.lora_A.weight": torch.randn(2, 8),
               f"transformer.{crafted[:1000 - 40]}.lora_B.weight": torch.randn(8, 2)}
    started = time.monotonic()
    parsed = tdm_lora.load_lora(_safetensors(tmp_path / "long_ok.safetensors", tensors))
    assert parsed.target_modules and time.monotonic() - started < 5
    too_long = {f"transformer.{'blocks.1' * 500}.lora_A.weight": torch.randn(2, 8),
                f"transformer.{'blocks.1' * 500}.lora_B.weight": torch.randn(8, 2)}
    _refused(_safetensors(tmp_path / "long.safetensors", too_long), "tensor name of")
