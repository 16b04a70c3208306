"""Decoding one radiograph file (PNG, DICOM, or this bundle's ``.npy`` cache) to one grey channel in [0, 1].

One convention for every source: bone bright, air dark (a PNG is taken as displayed; a DICOM MONOCHROME1
image is inverted after its VOI transform, as the DICOM display pipeline does). Only numpy, Pillow and
pydicom are used here, so cache-building worker processes stay light; the MONAI wrapper is
:class:`custom.transforms.load.LoadChestXrayd`.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")

# Radiographs are large (a 43 cm detector at 0.1 mm is 4300 px; scanned film up to ~12000 px a side), larger
# than Pillow's decompression-bomb default of 89.5 Mpx, which would warn on a 12000x12000 film. Pillow's guard
# is raised to this limit, process-wide, and each reader enforces its own `max_pixels` (default the same)
# from the header, BEFORE decoding, so the guard still holds.
DEFAULT_MAX_PIXELS = 16384 * 16384
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < DEFAULT_MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS

DEFAULT_MIN_SIZE = 32

# DICOM objects accepted as single-frame projection radiographs: CR, DX (for presentation and for processing)
# and Secondary Capture (scanned films); anything else (CT, MR, SR, multi-frame ...) is refused by name.
RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
RADIOGRAPH_MODALITIES = ("CR", "DX", "RG", "OT")


class ImageLoadError(ValueError):
    """A radiograph file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class PngHeader:
    """What a PNG's header chunks say, read without decoding any pixel.

    ``width``/``height`` in pixels; ``bit_depth`` per sample (1-16); ``colour_type`` as in the PNG spec
    (0 grey, 2 RGB, 3 palette, 4 grey+alpha, 6 RGBA); ``significant_bits`` from an ``sBIT`` chunk for the
    grey/first channel, or None when the file has none.
    """

    width: int
    height: int
    bit_depth: int
    colour_type: int
    significant_bits: int | None = None

    @property
    def decodes_to_16bit(self) -> bool:
        """True when the grey samples keep 16-bit precision on decoding (16-bit grey, PNG colour type 0)."""
        return self.bit_depth == 16 and self.colour_type == 0


@dataclass(frozen=True)
class GreyImage:
    """A decoded radiograph.

    ``array``: float32 (H', W') in [0, 1], bone bright; H' x W' equals ``original_size`` unless a reduction
    factor was applied on load (then ``original_size`` = ``reduction`` * (H', W') exactly).
    ``original_size``: (H, W) of the file as stored (rows, columns). ``bit_depth``: 8 or 16, the precision the
    source carries (a cache of it keeps uint8 or uint16). ``source_format``: 'png', 'dicom' or 'npy'.
    """

    array: np.ndarray
    original_size: tuple[int, int]
    bit_depth: int
    source_format: str
    reduction: int = 1


def read_png_header(path: str | os.PathLike) -> PngHeader:
    """Read a PNG's IHDR (and sBIT if present) without decoding pixels: a few hundred bytes at most.

    Raises ImageLoadError (naming the file) for an empty file, a file that is not a PNG, or a broken header.
    This is what makes reading the size of all 112,120 ChestX-ray14 PNGs take seconds, not minutes.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if not head:
                raise ImageLoadError(path, "file is empty (0 bytes)")
            if head != PNG_SIGNATURE:
                raise ImageLoadError(
                    path, f"not a PNG file (starts with {head[:8]!r}, not the PNG signature)"
                )
            return _read_png_chunks(path, handle)
    except OSError as error:
        raise ImageLoadError(path, f"cannot read file ({error.strerror or error})") from error


def _read_png_chunks(path: str | os.PathLike, handle) -> PngHeader:
    """Walk the chunks after the signature up to the first IDAT; return the IHDR fields and sBIT."""
    header = None
    significant_bits = None
    for _ in range(64):  # header chunks are few; a bound keeps a corrupt length from looping for long
        raw = handle.read(8)
        if len(raw) < 8:
            break
        length, kind = struct.unpack(">I4s", raw)
        if kind == b"IDAT" or length > 1 << 24:
            break
        data = handle.read(length)
        crc = handle.read(4)
        if len(data) < length or len(crc) < 4:
            break
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + data):
            raise ImageLoadError(path, f"corrupt PNG: CRC mismatch in the {kind.decode('latin-1')} chunk")
        if kind == b"IHDR":
            if length != 13:
                raise ImageLoadError(path, "corrupt PNG: IHDR chunk has the wrong length")
            width, height, bit_depth, colour_type = struct.unpack(">IIBB", data[:10])
            header = (width, height, bit_depth, colour_type)
        elif kind == b"sBIT" and data:
            significant_bits = data[0]
    if header is None:
        raise ImageLoadError(path, "corrupt or truncated PNG: no IHDR header chunk")
    width, height, bit_depth, colour_type = header
    if width == 0 or height == 0:
        raise ImageLoadError(path, f"corrupt PNG: header says {width}x{height} pixels")
    return PngHeader(width, height, bit_depth, colour_type, significant_bits)


def read_grey_image(
    path: str | os.PathLike,
    min_size: int = DEFAULT_MIN_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    downscale_to: int | None = None,
) -> GreyImage:
    """Decode a radiograph to one grey channel, float32 in [0, 1], bone bright and air dark.

    Args:
        path: a PNG (modes L, LA, RGB, RGBA, P; alpha must be 255 everywhere; 16-bit grey read with 16-bit
            precision), a DICOM file (single-frame projection radiograph: CR/DX/Secondary Capture), or a
            ``.npy`` written by this bundle's cache (uint8, uint16, or float in [0, 1]; shape (H, W) or
            (1, H, W)). The format is taken from the file's content (its signature), not from its name.
        min_size: the smallest accepted height and width in pixels; smaller images are refused.
        max_pixels: the largest accepted H * W, checked from the header before decoding.
        downscale_to: optional target side. When given, the image is reduced on load by the largest integer
            factor f that divides both H and W and keeps both sides >= downscale_to (block mean; exact
            geometry: the result covers the whole image, pixel (i, j) = mean of the f x f block), which bounds
            memory and time for very large files. None (default) keeps full resolution.

    Returns:
        A :class:`GreyImage`; ``array`` has shape (H / f, W / f), ``original_size`` = (H, W) of the file.

    Raises:
        ImageLoadError: naming the file and the reason (missing, empty, truncated/corrupt, not an image,
            unsupported DICOM object, transparent pixels, too small, too large).
    """
    path = Path(path)
    source_format = _content_format(path, _read_head(path)[0])
    if source_format == "png":
        grey, divisor, bit_depth = _decode_png(path, min_size, max_pixels)
    elif source_format == "npy":
        grey, divisor, bit_depth = _decode_npy(path)
    else:
        grey, divisor, bit_depth = _decode_dicom(path, max_pixels)
    height, width = grey.shape
    if min(height, width) < min_size:
        raise ImageLoadError(path, _too_small(height, width, min_size))
    factor = _reduction_factor(height, width, downscale_to)
    if factor > 1:
        # Block mean accumulated in float32 straight from the integer samples: no full-size float copy.
        array = grey.reshape(height // factor, factor, width // factor, factor).mean(
            axis=(1, 3), dtype=np.float32
        )
    else:
        # Every decoder returns an array of its own, so a float32 one (DICOM, float .npy) is not copied again.
        array = grey.astype(np.float32, copy=False)
    del grey
    if divisor is not None:
        np.divide(array, np.float32(divisor), out=array)  # in place: no float64 temporary of a large film
    return GreyImage(array, (height, width), bit_depth, source_format, factor)


def read_image_size(
    path: str | os.PathLike, min_size: int = DEFAULT_MIN_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """(H, W) of a radiograph file from its header alone, no pixel decoded: PNG IHDR, DICOM Rows/Columns
    (pixel data deferred, not read), ``.npy`` header.

    Refuses, with the messages of :func:`read_grey_image`, what the header already shows: a missing, empty
    or non-image file, a broken PNG header, a DICOM object that is not a single-frame grey projection
    radiograph (CT, SR, multi-frame, no pixel data ...), an image smaller than ``min_size`` per side or larger
    than ``max_pixels``. A file that passes may still fail to decode (truncated pixel data).

    Raises:
        ImageLoadError naming the file and the reason.
    """
    path = Path(path)
    head, header = _read_head(path, with_png_header=True)  # one open per PNG: 112,120 of them on NIH's data
    source_format = _content_format(path, head)
    if source_format == "png":
        height, width = header.height, header.width
    elif source_format == "npy":
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except (OSError, ValueError, EOFError) as error:
            raise ImageLoadError(path, f"truncated or corrupt .npy file ({error})") from error
        height, width = _npy_image_shape(path, shape)
    else:
        ds = _read_dicom(path, defer_size=1024)  # large values (the pixel data) are left unread
        _check_radiograph(path, ds)
        height, width = int(ds.Rows), int(ds.Columns)
    if min(height, width) < min_size:
        raise ImageLoadError(path, _too_small(height, width, min_size))
    if height * width > max_pixels:
        raise ImageLoadError(path, _too_large(height, width, max_pixels))
    return int(height), int(width)


def _read_head(path: Path, with_png_header: bool = False) -> tuple[bytes, PngHeader | None]:
    """The first 132 bytes of a file (enough for the PNG, .npy and DICOM signatures) and, when asked and the
    file is a PNG, its header chunks; refuses an empty, missing or unreadable file."""
    header = None
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
            if with_png_header and head.startswith(PNG_SIGNATURE):
                handle.seek(len(PNG_SIGNATURE))
                header = _read_png_chunks(path, handle)
    except FileNotFoundError as error:
        raise ImageLoadError(path, "file not found") from error
    except OSError as error:
        raise ImageLoadError(path, f"cannot read file ({error.strerror or error})") from error
    if not head:
        raise ImageLoadError(path, "file is empty (0 bytes)")
    return head, header


def _content_format(path: Path, head: bytes) -> str:
    """'png', 'npy' or 'dicom' from the file's signature (a DICOM without preamble by its extension)."""
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head[128:132] == b"DICM" or path.suffix.lower() in DICOM_EXTENSIONS:
        return "dicom"
    kind = "text" if _looks_like_text(head) else "unrecognised binary data"
    raise ImageLoadError(path, f"not a PNG, DICOM or .npy image (content is {kind}, starting {head[:16]!r})")


def _read_dicom(path: Path, defer_size: int | None = None):
    """pydicom.dcmread(force=True); a file pydicom cannot parse is refused naming it."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, force=True, defer_size=defer_size)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as error:
        raise ImageLoadError(path, f"unreadable DICOM ({error})") from error


def _too_small(height: int, width: int, min_size: int) -> str:
    """The message for an image below the minimum size."""
    return f"image is {height}x{width} pixels (HxW), smaller than the minimum of {min_size} px per side"


def _too_large(height: int, width: int, max_pixels: int) -> str:
    """The message for an image above the pixel limit."""
    return f"image is {height}x{width} pixels, more than the limit of {max_pixels} pixels"


def _npy_image_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int]:
    """(H, W) of a cache array stored as (H, W) or (1, H, W); any other shape is refused naming the file."""
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise ImageLoadError(path, f".npy array has shape {tuple(shape)}; expected (H, W) or (1, H, W)")
    return int(shape[0]), int(shape[1])


def _reduction_factor(height: int, width: int, downscale_to: int | None) -> int:
    """Largest integer f dividing H and W with min(H, W) / f >= downscale_to (1 when none or not asked)."""
    if downscale_to is None:
        return 1
    if downscale_to < 1:
        raise ValueError(f"downscale_to must be a positive side length, got {downscale_to}")
    for factor in range(min(height, width) // downscale_to, 1, -1):
        if height % factor == 0 and width % factor == 0:
            return factor
    return 1


def _looks_like_text(head: bytes) -> bool:
    """True when nearly all first bytes are printable ASCII (a text or HTML error page saved as an image)."""
    printable = sum(32 <= byte < 127 or byte in (9, 10, 13) for byte in head)
    return bool(head) and printable >= 0.9 * len(head)


def _decode_png(path: Path, min_size: int, max_pixels: int) -> tuple[np.ndarray, int, int]:
    """Decode a PNG: (grey (H, W) uint8 or uint16, divisor, bit depth 8/16); the image is grey / divisor.

    The divisor is 255 or 65535, except for 16-bit grey with an sBIT chunk declaring b < 16 significant bits
    whose values all stay below 2**b: an encoder that did not scale its b-bit data up as the PNG spec asks,
    so 2**b - 1 is used (dividing by 65535 would leave such a film nearly black).
    """
    header = read_png_header(path)
    if min(header.height, header.width) < min_size:
        raise ImageLoadError(path, _too_small(header.height, header.width, min_size))
    if header.width * header.height > max_pixels:
        raise ImageLoadError(path, _too_large(header.height, header.width, max_pixels))
    try:
        with Image.open(path) as image:
            image.load()
            grey = _pil_to_grey(path, image)
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, zlib.error, UnidentifiedImageError, EOFError) as error:
        raise ImageLoadError(path, f"truncated or corrupt PNG ({error})") from error
    if grey.dtype != np.uint16:
        return grey, 255, 8
    sbit = header.significant_bits
    if sbit is not None and 8 <= sbit < 16 and int(grey.max()) < 2**sbit:
        return grey, 2**sbit - 1, 16
    return grey, 65535, 16


def _pil_to_grey(path: Path, image: Image.Image) -> np.ndarray:
    """One grey channel of a loaded PIL image: uint8 (H, W), or uint16 (H, W) for 16-bit grey.

    Colour images become luma (ITU-R 601; exact for NIH's RGBA files, whose colour channels are equal: the
    weights sum to one in Pillow's fixed point). An alpha channel must be 255 everywhere: a transparent
    radiograph has no defined grey value.
    """
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(image).astype(np.uint16, copy=False)
    if mode == "I":
        array = np.asarray(image)
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise ImageLoadError(path, f"32-bit integer PNG with values {low}..{high}, outside 0..65535")
        return array.astype(np.uint16)
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "RGBA"):
        low, high = image.getchannel("A").getextrema()
        if low != 255:
            raise ImageLoadError(
                path,
                f"{mode} image has transparent pixels (alpha {low}..{high}); a radiograph must be opaque",
            )
        image = image.convert("L")
    elif mode == "RGB":
        image = image.convert("L")
    elif mode != "L":
        raise ImageLoadError(
            path, f"unsupported PNG mode {mode!r} (expected L, LA, RGB, RGBA, P or 16-bit grey)"
        )
    return np.asarray(image)


def _decode_npy(path: Path) -> tuple[np.ndarray, int | None, int]:
    """Read a cache ``.npy``: (array (H, W), divisor 255/65535 or None for float in [0, 1], bit depth)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise ImageLoadError(path, f"truncated or corrupt .npy file ({error})") from error
    array = array.reshape(_npy_image_shape(path, array.shape))  # (1, H, W) -> (H, W), a view
    if array.dtype == np.uint8:
        return array, 255, 8
    if array.dtype == np.uint16:
        return array, 65535, 16
    if array.dtype in (np.float32, np.float64):
        low, high = float(array.min()), float(array.max())
        if not (np.isfinite(low) and np.isfinite(high) and low >= 0.0 and high <= 1.0):
            raise ImageLoadError(path, f"float .npy values span {low}..{high}, not within [0, 1]")
        return array, None, 16
    raise ImageLoadError(
        path, f".npy dtype {array.dtype} unsupported (expected uint8, uint16 or float in [0, 1])"
    )


def _decode_dicom(path: Path, max_pixels: int) -> tuple[np.ndarray, None, int]:
    """Decode a single-frame projection radiograph DICOM: (float32 (H, W) in [0, 1] bone bright, None, bits).

    The stored values go through the file's Modality LUT / rescale and then its VOI LUT / window
    (pydicom.pixels.apply_modality_lut, apply_voi_lut, as the file says), and the result is scaled by the
    range that pipeline gives over ALL possible stored values (from Bits Stored and Pixel Representation),
    so the scaling depends on the header only, never on the image content. MONOCHROME1 is inverted last.
    Both transforms are pointwise in the stored value, so they are evaluated once on the (at most 65,536)
    possible stored values and applied as a float32 lookup table: no float64 copy of the image is made.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = _read_dicom(path)
    _check_radiograph(path, ds)
    rows, columns = int(ds.Rows), int(ds.Columns)
    if rows * columns > max_pixels:
        raise ImageLoadError(path, _too_large(rows, columns, max_pixels))
    bits_stored = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 0) or 0)
    if not 1 <= bits_stored <= 16:
        raise ImageLoadError(path, f"DICOM Bits Stored {bits_stored} unsupported (1-16 bits expected)")
    try:
        stored = ds.pixel_array
    except Exception as error:  # pydicom raises many types here (missing decoder plugin, short pixel data)
        raise ImageLoadError(
            path, f"cannot decode DICOM pixel data ({type(error).__name__}: {error})"
        ) from error
    if stored.shape != (rows, columns):
        raise ImageLoadError(
            path, f"DICOM pixel data has shape {stored.shape}, expected one frame {rows}x{columns}"
        )
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    low = -(2 ** (bits_stored - 1)) if signed else 0
    possible = np.arange(low, low + 2**bits_stored, dtype=np.int32)
    values = np.asarray(apply_voi_lut(apply_modality_lut(possible, ds), ds), dtype=np.float64)
    out_low, out_high = float(values.min()), float(values.max())
    if not out_high > out_low:
        raise ImageLoadError(path, "DICOM Modality/VOI transforms map every stored value to one grey level")
    lut = ((values - out_low) / (out_high - out_low)).astype(np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        lut = np.float32(1.0) - lut
    if signed:
        index = stored.astype(np.int32) - low
    else:
        index = stored
    np.clip(index, 0, len(lut) - 1, out=index)  # values beyond Bits Stored: the nearest end of the range
    return lut[index], None, 8 if bits_stored <= 8 else 16


def _check_radiograph(path: Path, ds) -> None:
    """Refuse DICOM objects that are not a single-frame grey projection radiograph, naming what they are."""
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    modality = str(ds.get("Modality", "")).upper()
    if sop_class and sop_class not in RADIOGRAPH_SOP_CLASSES:
        raise ImageLoadError(
            path,
            f"DICOM SOP class {_sop_class_name(sop_class)} ({sop_class}) is not a projection radiograph "
            "(CR, DX or Secondary Capture expected)",
        )
    if modality and modality not in RADIOGRAPH_MODALITIES:
        raise ImageLoadError(
            path,
            f"DICOM modality {modality} is not a projection radiograph "
            f"(expected one of {RADIOGRAPH_MODALITIES})",
        )
    if not sop_class and not modality:
        raise ImageLoadError(
            path, "DICOM has neither SOP Class UID nor Modality; cannot tell it is a radiograph"
        )
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise ImageLoadError(path, "DICOM has float pixel data, which a projection radiograph does not have")
    if "PixelData" not in ds:
        raise ImageLoadError(path, "DICOM has no pixel data (element 7FE0,0010 is absent)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageLoadError(path, f"DICOM has {frames} frames; a single-frame radiograph is expected")
    samples = int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageLoadError(
            path,
            f"DICOM is {photometric or 'of unknown photometry'} with {samples} sample(s) per pixel; a grey "
            "radiograph (MONOCHROME1/MONOCHROME2, 1 sample) is expected",
        )
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageLoadError(path, "DICOM lacks Rows/Columns")


def _sop_class_name(uid: str) -> str:
    """The registered name of a SOP class UID (e.g. 'CT Image Storage'), or 'unknown'."""
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else "unknown"
