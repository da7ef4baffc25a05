"""Crafted checkpoints through both importers' command lines: each is refused with one line and
exit status 2, and a sentinel file that each payload would create shows that nothing ran. Each
payload is first shown to be live: torch.load(weights_only=False), what the NeTI importer used
before, runs it and the sentinel appears."""
import io
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import traverse_util

from spacetime_jax.elite import importer as elite_importer
from spacetime_jax.neti import importer as neti_importer
from tests.test_neti_importer import official_modules_importable, save_official_checkpoint

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """An object whose unpickling calls `function(*args)`."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _touch_code(sentinel: Path) -> str:
    return f"open({str(sentinel)!r}, 'w').close()"


def _checkpoint(payload) -> dict:
    """What looks like a NeTI checkpoint, the payload in its cfg."""
    return {"state_dict": {"net.1.weight": torch.zeros(2, 2)}, "cfg": payload, "encoder": {}}


def _saved(obj, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def _archive(data_pkl: bytes, compression: int = zipfile.ZIP_STORED) -> bytes:
    """A torch.save zip archive whose data.pkl is replaced by hand-written pickle bytes."""
    genuine = zipfile.ZipFile(io.BytesIO(_saved({"x": torch.zeros(1)})))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive:
        for info in genuine.infolist():
            data = genuine.read(info)
            archive.writestr(info.filename, data_pkl if info.filename.endswith("/data.pkl")
                             else data)
    return out.getvalue()


def _unicode(text: str) -> bytes:  # pickle's BINUNICODE opcode
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _recursive_torch_load(sentinel: Path, folder: Path) -> bytes:
    """torch.serialization.load(inner, None, pickle): torch.load given a pickle module defaults
    to weights_only=False and runs the inner file's os.system. The pickle module is fetched as
    an attribute of torch.serialization, so no import appears in the file."""
    inner = folder / "inner.pt"
    inner.write_bytes(_saved(_checkpoint(Payload(os.system, f"touch {sentinel}"))))
    data_pkl = (b"\x80\x02ctorch.serialization\nload\n" + _unicode(str(inner))
                + b"Nctorch.serialization\npickle\n\x87R.")
    return _archive(data_pkl)


def _stack_global(sentinel: Path) -> bytes:
    """Pickle protocol 4: the global's name is built on the stack (STACK_GLOBAL), not written
    after a GLOBAL opcode, so a scan for GLOBAL opcodes alone would not see it."""
    return _archive(pickle.dumps(Payload(exec, _touch_code(sentinel)), protocol=4))


def _pickle_in_storage(sentinel: Path) -> bytes:
    """A uint8 tensor whose storage bytes are a pickle that would run os.system."""
    hidden = pickle.dumps(Payload(os.system, f"touch {sentinel}"), protocol=2)
    tensor = torch.frombuffer(bytearray(hidden), dtype=torch.uint8)
    return _saved({"state_dict": {"mapping_0.0.weight": tensor}, "cfg": {}, "encoder": {}})


def _payload_in_the_official_encoder(sentinel: Path) -> bytes:
    """The official encoder class (a registered name) carrying the payload as an attribute:
    registered names open no door for what they hold."""
    from tests.test_neti_importer import NeTIPositionalEncoding
    encoder = NeTIPositionalEncoding(0.03, 2.0, 4, w_as_parameter=False)
    encoder.w = Payload(eval, _touch_code(sentinel))
    with official_modules_importable():
        return _saved({"state_dict": {}, "cfg": {}, "encoder": encoder})


# name -> (file bytes for a sentinel path and a scratch folder, whether torch.load runs it)
CRAFTED = {
    "os_system": lambda s, d: _saved(_checkpoint(Payload(os.system, f"touch {s}"))),
    "subprocess_check_call": lambda s, d: _saved(_checkpoint(
        Payload(subprocess.check_call, ["touch", str(s)]))),
    "builtins_eval": lambda s, d: _saved(_checkpoint(Payload(eval, _touch_code(s)))),
    "builtins_exec": lambda s, d: _saved(_checkpoint(Payload(exec, _touch_code(s)))),
    # numpy.testing's runstring(astr, dict) is exec(astr, dict); a numpy.* allowlist admits it.
    "numpy_runstring": lambda s, d: _saved(_checkpoint(
        Payload(np.testing._private.utils.runstring, _touch_code(s), {}))),
    "torch_save_writes_a_file": lambda s, d: _saved(_checkpoint(
        Payload(torch.save, "written", str(s)))),
    "torch_load_recursive": _recursive_torch_load,
    "stack_global_protocol_4": lambda s, d: _stack_global(s),
    "payload_in_official_encoder": lambda s, d: _payload_in_the_official_encoder(s),
    "legacy_format": lambda s, d: _saved(_checkpoint(Payload(os.system, f"touch {s}")),
                                         _use_new_zipfile_serialization=False),
    "compressed_records": lambda s, d: _archive(
        pickle.dumps(Payload(os.system, f"touch {s}"), protocol=2), zipfile.ZIP_DEFLATED),
    "pickle_in_tensor_storage": lambda s, d: _pickle_in_storage(s),
}


def _crafted(name: str, folder: Path) -> tuple[Path, Path]:
    sentinel = folder / "sentinel"
    path = folder / f"{name}.pt"
    path.write_bytes(CRAFTED[name](sentinel, folder))
    return path, sentinel


def _run_payload(name: str, path: Path) -> None:
    """What an unsafe loader does with the file."""
    if name == "pickle_in_tensor_storage":
        tensor = torch.load(path, weights_only=True)["state_dict"]["mapping_0.0.weight"]
        pickle.loads(tensor.numpy().tobytes())
    elif name == "payload_in_official_encoder":
        with official_modules_importable():
            torch.load(path, weights_only=False)
    elif name == "compressed_records":
        with zipfile.ZipFile(path) as archive:
            pickle.loads(archive.read("archive/data.pkl"))
    else:
        torch.load(path, weights_only=False)


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_each_payload_is_live(tmp_path, name):
    path, sentinel = _crafted(name, tmp_path)
    try:
        _run_payload(name, path)
    except Exception:  # what a payload returns need not make a checkpoint
        pass
    assert sentinel.exists(), f"{name}: the payload did not run, so the test proves nothing"


def _cli_refusal(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_neti_importer_refuses_without_running_it(tmp_path, capsys, name):
    path, sentinel = _crafted(name, tmp_path)
    err = _cli_refusal(neti_importer.main, [str(path), "--out", str(tmp_path / "out")], capsys)
    assert path.name in err
    assert not sentinel.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_elite_importer_refuses_without_running_it(tmp_path, capsys, name):
    path, sentinel = _crafted(name, tmp_path)
    err = _cli_refusal(elite_importer.main, ["--global_mapper", str(path), "--model",
                                             "builtin:toyworld", "--out", str(tmp_path / "out")],
                       capsys)
    assert path.name in err
    assert not sentinel.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,reason", [
    ("os_system", "it names posix.system"),  # os.system, as Linux names it
    ("subprocess_check_call", "it names subprocess.check_call"),
    ("builtins_eval", "it names builtins.eval"),
    ("numpy_runstring", "it names numpy.testing._private.utils.runstring"),
    ("torch_load_recursive", "it names torch.serialization.load"),
    ("stack_global_protocol_4", "it uses pickle opcode FRAME"),
    ("legacy_format", "not the zip archive torch.save writes"),
    ("compressed_records", "its record archive/data.pkl is compressed")])
def test_refusal_says_why(tmp_path, capsys, name, reason):
    path, _ = _crafted(name, tmp_path)
    err = _cli_refusal(neti_importer.main, [str(path), "--out", str(tmp_path / "out")], capsys)
    assert reason in err


@pytest.mark.parametrize("module", ["spacetime_jax.neti.importer", "spacetime_jax.elite.importer"])
def test_command_in_its_own_process_exits_2(tmp_path, module):
    path, sentinel = _crafted("os_system", tmp_path)
    args = ([str(path)] if module.endswith("neti.importer")
            else ["--global_mapper", str(path), "--model", "builtin:toyworld"])
    result = subprocess.run([sys.executable, "-m", module, *args, "--out", str(tmp_path / "o")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "posix.system" in lines[0]
    assert not sentinel.exists()


# ------------------------------------------------------------------ genuine files still import

def test_genuine_neti_checkpoint_imports_bit_equal(tmp_path):
    path = tmp_path / "mapper-steps-1000.pt"
    torch_mapper = save_official_checkpoint(path, fourier=True, cfg_as_object=True,
                                            w_as_parameter=False, target_norm=0.5, seed=4)
    imported = neti_importer.import_neti_checkpoint(path)
    params = traverse_util.flatten_dict(imported.variables["params"], sep=".")
    state = torch_mapper.state_dict()
    for name, value in params.items():
        module, leaf = name.rsplit(".", 1)  # net_1.kernel -> net.1.weight
        torch_name = re.sub(r"_(\d+)$", r".\1", module) + (".bias" if leaf == "bias"
                                                          else ".weight")
        expected = state[torch_name].numpy()
        np.testing.assert_array_equal(np.asarray(value), expected.T if leaf == "kernel"
                                      else expected, err_msg=name)
    np.testing.assert_array_equal(imported.variables["encoding"]["W"], torch_mapper.encoder.w)
    assert len(params) == 12  # input_layer, net.1, 2, 4, 5, output_layer.0: weight and bias
    assert imported.raw_cfg_dict["data"]["train_data_dir"] == "data/cat_toy"


def test_genuine_elite_state_dict_loads_bit_equal(tmp_path):
    state = {"mapping_0.0.weight": torch.randn(3, 4), "mapping_0.0.bias": torch.randn(3),
             "mid_block_attentions_0_transformer_blocks_0_attn2_to_k.weight": torch.randn(2, 5)}
    torch.save(state, tmp_path / "global_mapper.pt")
    loaded = elite_importer.load_state_dict_file(tmp_path / "global_mapper.pt")
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert loaded[key].tobytes() == value.numpy().tobytes(), key
